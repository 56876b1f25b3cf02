"""A thin adapter over the MLflow tracking store and model registry.

Promotion is an alias move (``champion`` by default; stages are deprecated in MLflow). The registered
model keeps a ``previous_<alias>`` tag so ``rollback`` can move the alias back. Versions carry lineage
tags (data hashes from ``dvc.lock``, params hash, git commit, adapter hash) and a model card.

Failures are of two kinds. A definite answer ("no such alias", "no such model") is a result. Anything
else (a locked SQLite file, a timeout, a tracking server restarting) is retried with backoff and then
raises ``RegistryUnavailable``: "could not read" is never turned into "absent", so no gate judges a
candidate against the base because the champion could not be read, and no compare-and-set "confirms" an
empty alias.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

from pipeline.config import RegistryConfig
from pipeline.hashing import dir_sha256
from pipeline.pii import mask_secrets


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: int
    run_id: str
    source: str
    tags: dict[str, str]


T = TypeVar("T")
# Error codes that are the registry's answer, not a failure to get one.
DEFINITE = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS",
                      "PERMISSION_DENIED", "UNAUTHENTICATED", "BAD_REQUEST", "INVALID_STATE"})


class RegistryUnavailable(RuntimeError):
    """The registry did not answer (after retries): nothing may be decided from this call."""


def definite(err: BaseException) -> bool:
    """Whether ``err`` is the registry's answer (a missing alias, a bad name), not a failure to reach it."""
    return getattr(err, "error_code", None) in DEFINITE


def absent(err: BaseException) -> bool:
    """Whether ``err`` says the thing asked for does not exist (an alias, a model, a version)."""
    return getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST" or (
        getattr(err, "error_code", None) == "INVALID_PARAMETER_VALUE" and "not found" in str(err))


def call(cfg: RegistryConfig, what: str, fn: Callable[[], T], sleep: Callable[[float], None] = time.sleep) -> T:
    """Run ``fn`` (registry calls); definite answers pass through at once, other failures are retried
    ``cfg.retries`` times with doubling waits and then raise ``RegistryUnavailable`` naming ``what``."""
    delay = cfg.retry_backoff_s
    for attempt in range(cfg.retries + 1):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - sorted below: a definite answer or a transient failure
            if definite(err) or isinstance(err, (TypeError, AttributeError, KeyError)):
                raise
            if attempt == cfg.retries:
                raise RegistryUnavailable(f"registry {cfg.tracking_uri}: could not {what} after {cfg.retries + 1} "
                                          f"attempts: {type(err).__name__}: {str(err)[:300]}") from err
            sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def client(cfg: RegistryConfig):
    import mlflow
    from mlflow import MlflowClient

    # MLflow's own HTTP defaults are a 120 s timeout and 7 retries with backoff (minutes); loraflow retries
    # itself, per operation, so each request is bounded here.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(cfg.timeout_s, 1))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = cfg.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def experiment_id(c, cfg: RegistryConfig) -> str:
    exp = c.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    root = cfg.artifact_root
    if "://" not in root:
        Path(root).mkdir(parents=True, exist_ok=True)
        root = Path(root).resolve().as_uri()
    return c.create_experiment(cfg.experiment, artifact_location=root)


def _flatten(prefix: str, d: dict) -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(key, v))
        else:
            out[key] = str(v)[:500]
    return out


def log_candidate(
    cfg: RegistryConfig,
    *,
    run_name: str,
    params: dict,
    adapter_dir: Path,
    train_metrics: dict,
    eval_metrics: dict,
    artifacts: dict[str, Path],
    tags: dict[str, str],
    adapter_texts: dict[str, str] | None = None,
) -> str:
    """Log one training run (params, loss curve, eval metrics, adapter, reports); returns its run id.
    ``adapter_texts`` (file name -> text) go next to the adapter (the Hugging Face card ``README.md``)."""
    import mlflow

    c = client(cfg)
    with mlflow.start_run(experiment_id=experiment_id(c, cfg), run_name=run_name, tags=tags) as run:
        mlflow.log_params(_flatten("", mask_secrets(params)))
        for point in train_metrics.get("loss_curve", []):
            mlflow.log_metric("train_loss", point["loss"], step=point["step"])
        for point in train_metrics.get("eval_loss_curve", []):
            mlflow.log_metric("eval_loss", point["eval_loss"], step=point["step"])
        for key in ("duration_s", "tokens_per_s", "peak_memory_mb", "steps", "train_samples", "generic_samples",
                    "gpu_hours", "estimated_cost", "best_eval_loss", "resumed_from_step"):
            if isinstance(train_metrics.get(key), (int, float)):
                mlflow.log_metric(f"train_{key}" if not key.startswith("train") else key, train_metrics[key])
        privacy = train_metrics.get("privacy") or {}
        for key in ("epsilon", "delta", "noise_multiplier", "sample_rate", "record_epsilon"):
            if isinstance(privacy.get(key), (int, float)):
                mlflow.log_metric(f"privacy_{key}", privacy[key])
        for model, metrics in eval_metrics.items():
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    mlflow.log_metric(f"{model}_{k}", v)
        mlflow.log_artifacts(str(adapter_dir), "adapter")
        for name, text in (adapter_texts or {}).items():
            mlflow.log_text(text, f"adapter/{name}")
        for name, path in artifacts.items():
            if path.is_file():
                mlflow.log_artifact(str(path), name)
        return run.info.run_id


def find_run_by_adapter(cfg: RegistryConfig, adapter_sha: str) -> str | None:
    """A finished run that already logged this adapter (a crash between logging and registering)."""
    c = client(cfg)
    runs = c.search_runs([experiment_id(c, cfg)], f"tags.adapter_sha256 = '{adapter_sha}' and attributes.status = 'FINISHED'",
                         max_results=1)
    return runs[0].info.run_id if runs else None


def find_version_by_adapter(cfg: RegistryConfig, name: str, adapter_sha: str) -> VersionInfo | None:
    c = client(cfg)
    for mv in c.search_model_versions(f"name = '{name}'"):
        if mv.tags.get("adapter_sha256") == adapter_sha:
            return _info(mv)
    return None


def latest_version(cfg: RegistryConfig, name: str) -> VersionInfo | None:
    """The highest registered version of ``name``; None only when the registry says there is none."""

    def read() -> VersionInfo | None:
        try:
            versions = client(cfg).search_model_versions(f"name = '{name}'")
        except Exception as err:  # noqa: BLE001 - only "not found" is an answer; the rest is retried
            if absent(err):
                return None
            raise
        return _info(max(versions, key=lambda mv: int(mv.version))) if versions else None

    return call(cfg, f"read the versions of {name}", read)


def register(cfg: RegistryConfig, name: str, run_id: str, tags: dict[str, str], card: str) -> VersionInfo:
    from mlflow.exceptions import MlflowException

    c = client(cfg)
    try:
        c.create_registered_model(name, description="LoRA adapters fine-tuned by loraflow.")
    except MlflowException as err:
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise
    mv = c.create_model_version(name, f"runs:/{run_id}/adapter", run_id=run_id, tags=tags,
                                description=version_description(card, run_id))
    return _info(mv)


def describe_version(cfg: RegistryConfig, name: str, version: int, card: str, run_id: str) -> None:
    """Replace a version's description (the card the MLflow UI shows), e.g. after its gate decided again."""
    call(cfg, f"describe {name} v{version}", lambda: client(cfg).update_model_version(
        name, str(version), description=version_description(card, run_id)))


# MLflow's SQL schema holds a version description in VARCHAR(5000): PostgreSQL and MySQL reject longer ones
# (SQLite does not check), so a long card is cut there; the whole card is the adapter's README.md.
MAX_DESCRIPTION = 5000


def version_description(card: str, run_id: str) -> str:
    """The card without its YAML front matter (the hub's metadata; the UI shows the markdown), cut to fit."""
    if card.startswith("---\n") and "\n---\n" in card[4:]:
        card = card[4:].split("\n---\n", 1)[1].lstrip("\n")
    if len(card) <= MAX_DESCRIPTION:
        return card
    note = f"\n\n[... cut at MLflow's {MAX_DESCRIPTION}-character limit; the whole card: runs:/{run_id}/adapter/README.md]"
    return card[:MAX_DESCRIPTION - len(note)] + note


def _info(mv) -> VersionInfo:
    return VersionInfo(mv.name, int(mv.version), mv.run_id, mv.source, dict(mv.tags or {}))


def get_alias(cfg: RegistryConfig, name: str, alias: str | None = None) -> VersionInfo | None:
    """The version ``name@alias`` points at; None only when the registry says there is none (no such
    alias or model). A registry that does not answer raises ``RegistryUnavailable`` after retries."""

    def read() -> VersionInfo | None:
        try:
            return _info(client(cfg).get_model_version_by_alias(name, alias or cfg.alias))
        except Exception as err:  # noqa: BLE001 - only "not found" is an answer; the rest is retried
            if absent(err):
                return None
            raise

    return call(cfg, f"read {name}@{alias or cfg.alias}", read)


def get_version(cfg: RegistryConfig, name: str, version: int) -> VersionInfo:
    return call(cfg, f"read {name} v{version}", lambda: _info(client(cfg).get_model_version(name, str(version))))


class AliasMoved(RuntimeError):
    """The alias no longer points where the caller's decision assumed (compare-and-set failed)."""

    def __init__(self, name: str, alias: str, expected: int | None, current: int | None):
        self.expected, self.current = expected, current
        super().__init__(f"{name}@{alias} points at {_v(current)}, not {_v(expected)} as when the gate ran")


def _v(version: int | None) -> str:
    return f"v{version}" if version is not None else "no version"


ANY = object()  # promote(expected=ANY): move the alias whatever it points at (a person's command)


HISTORY_TAG = "alias_history"  # registered-model tags: one per entry, "alias_history.<alias>.<time>.<id>.<kind>"
OUTSIDE = "outside loraflow (MLflow UI or API)"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _entry_key(alias: str, at: str, entry_id: str, kind: str) -> str:
    stamp = datetime.fromisoformat(at).strftime("%Y%m%dT%H%M%S.%f")
    return f"{HISTORY_TAG}.{alias}.{stamp}.{entry_id}.{kind}"


def _write_entry(cfg: RegistryConfig, name: str, kind: str, entry: dict) -> None:
    """Append one entry: a tag of its own, never a rewrite of another (the history is append-only, so two
    writers cannot lose each other's entries)."""
    key = _entry_key(cfg.alias, entry["at"], entry["id"], kind)
    call(cfg, f"record {name}@{cfg.alias} history",
         lambda: client(cfg).set_registered_model_tag(name, key, json.dumps({**entry, "kind": kind})))


def _entries(tags: dict[str, str], alias: str) -> list[dict]:
    """Every history entry in ``tags`` (oldest first). The single JSON tag of earlier releases is read as
    confirmed moves before them; it is never written again."""
    out: list[dict] = []
    try:
        legacy = json.loads(tags.get(f"{HISTORY_TAG}_{alias}", "[]"))
    except json.JSONDecodeError:
        legacy = []
    for i, m in enumerate(legacy if isinstance(legacy, list) else []):
        if isinstance(m, dict):
            out.append({**m, "id": f"legacy{i}", "kind": "outside" if m.get("by") == OUTSIDE else "done"})
    prefix = f"{HISTORY_TAG}.{alias}."
    for key in sorted(k for k in tags if k.startswith(prefix)):
        try:
            entry = json.loads(tags[key])
        except json.JSONDecodeError:
            continue  # not ours to judge; a person's tag with our prefix
        if isinstance(entry, dict):
            out.append(entry)
    return out


def merge_history(entries: list[dict], current: int | None = None) -> list[dict]:
    """The alias's moves from the raw entries, oldest first: ``{"at", "from", "to", "by"}`` (+ ``"unconfirmed":
    True`` for a loraflow move whose intent was written and whose completion was not, shown only when what
    came after shows it happened, or it is the last and the alias is at ``current``, where it took it).
    A move written as failed is not a move."""
    by_id: dict[str, dict] = {}
    order: list[str] = []
    for e in entries:
        eid = str(e.get("id"))
        if eid not in by_id:
            order.append(eid)
            by_id[eid] = {"at": e.get("at"), "from": e.get("from"), "to": e.get("to"), "by": e.get("by"),
                          "state": e.get("kind")}
        elif e.get("kind") in ("done", "failed"):
            by_id[eid].update(state=e.get("kind"), at=e.get("at"))
    moves = [by_id[i] for i in order if by_id[i]["state"] != "failed"]
    out = []
    for n, m in enumerate(moves):
        if m["state"] == "intent":
            later = moves[n + 1:]
            if (later[0].get("from") if later else current) != m["to"]:
                continue  # in flight, or never happened: what follows does not start where it would end
            m = {**m, "unconfirmed": True}
        out.append({k: v for k, v in m.items() if k != "state"})
    return out


def _pending(entries: list[dict]) -> tuple[int | None, dict[str, dict]]:
    """Where the last settled entry left the alias, and loraflow's moves still in flight (an intent with no
    completion or failure after it), by id."""
    settled, pending, ended = None, {}, set()
    for e in entries:
        eid = str(e.get("id"))
        if e.get("kind") in ("done", "failed"):
            ended.add(eid)
            pending.pop(eid, None)
            if e.get("kind") == "done":
                settled = e.get("to")
                pending.clear()  # loraflow's moves are serialised (the retrain lock): earlier intents are over
        elif e.get("kind") == "outside":
            settled = e.get("to")
        elif e.get("kind") == "intent" and eid not in ended:
            pending[eid] = e
    return settled, pending


def history(cfg: RegistryConfig, name: str) -> list[dict]:
    """The alias's recorded moves, oldest first: ``{"at", "from", "to", "by"}``. Reads only."""
    info = get_alias(cfg, name)
    tags = call(cfg, f"read {name}'s tags", lambda: client(cfg).get_registered_model(name).tags) or {}
    return merge_history(_entries(tags, cfg.alias), info.version if info is not None else None)


def reconcile_history(cfg: RegistryConfig, name: str, write: bool = True) -> list[dict]:
    """The history, with a move made outside loraflow (the MLflow UI, its API) added when the alias points
    where neither the last settled entry nor a loraflow move in flight takes it. Returns the history.

    The alias is read *before* the entries: loraflow writes a move's intent before it moves the alias, so
    any loraflow move visible in the alias is visible in the entries read after it; a person is named only
    for a move no entry explains. The outside entry's key is derived from what it follows, so several
    reconcilers noting the same move write one entry. ``write=False``: the same view, nothing written
    (``loraflow status``)."""
    info = get_alias(cfg, name)
    tags = call(cfg, f"read {name}'s tags", lambda: client(cfg).get_registered_model(name).tags) or {}
    entries = _entries(tags, cfg.alias)
    current = info.version if info is not None else None
    settled, pending = _pending(entries)
    if current is None or current == settled:
        return merge_history(entries, current)
    landed = [e for e in pending.values() if e.get("to") == current]
    if landed:
        # loraflow's move, evidently done; its completion may never come (its writer died after the move):
        # write it here, so what follows starts from it.
        done = {**{k: landed[-1][k] for k in ("id", "from", "to", "by")}, "at": _now()}
        if write:
            _note_history(lambda: _write_entry(cfg, name, "done", done))
        return merge_history(entries + [{**done, "kind": "done"}], current)
    after = str(entries[-1].get("id")) if entries else "start"
    # Derived from what it follows (so two reconcilers write one entry) and bounded (a key has 250 chars).
    entry = {"id": f"outside-{hashlib.sha256(after.encode()).hexdigest()[:12]}-v{current}", "at": _now(),
             "from": settled, "to": current, "by": OUTSIDE}
    # Another reconciler may have noted it already (same id): one entry per move.
    if write and not any(str(e.get("id")) == entry["id"] for e in entries):
        _write_entry(cfg, name, "outside", entry)
    return merge_history(entries + [{**entry, "kind": "outside"}], current)


def promote(cfg: RegistryConfig, name: str, version: int, expected: int | None | object = ANY,
            by: str = "loraflow promote") -> VersionInfo:
    """Point the alias at ``version``; the version it left keeps the ``previous_<alias>`` alias (and the
    model tag of that name) for ``rollback``.

    ``expected``: compare-and-set; the move happens only if the alias still points at that version
    (``None``: at no version) and raises ``AliasMoved`` otherwise. MLflow has no atomic compare-and-set,
    so the check and the move are a read and a write a few milliseconds apart; loraflow's own writers
    are serialised by the retrain lock, which leaves only a person's click inside that window.

    The history gets an intent entry before the move and a completion after it (append-only tags): a
    reader between the two sees loraflow's move in flight, never a person's.
    """
    mv = call(cfg, f"read {name} v{version}", lambda: client(cfg).get_model_version(name, str(version)))
    current = get_alias(cfg, name)  # raises RegistryUnavailable rather than "no champion"
    now = current.version if current else None
    if expected is not ANY and now != expected:
        raise AliasMoved(name, cfg.alias, expected, now)

    def move() -> None:
        c = client(cfg)
        if now is not None and now != version:
            c.set_registered_model_tag(name, f"previous_{cfg.alias}", str(now))
            c.set_registered_model_alias(name, f"previous_{cfg.alias}", str(now))
        c.set_registered_model_alias(name, cfg.alias, str(version))

    if now == version:
        call(cfg, f"move {name}@{cfg.alias} to v{version}", move)
        return _info(mv)
    if now is not None:
        _note_history(lambda: reconcile_history(cfg, name))  # a UI move before this one, recorded as such
    entry = {"id": uuid.uuid4().hex[:12], "at": _now(), "from": now, "to": version, "by": by}
    # The intent is not bookkeeping: without it a reader could name a person for this move. No intent, no move.
    _write_entry(cfg, name, "intent", entry)
    try:
        call(cfg, f"move {name}@{cfg.alias} to v{version}", move)
    except Exception:
        with contextlib.suppress(Exception):  # a move known not to have happened is written off as failed
            after = get_alias(cfg, name)
            if after is None or after.version != version:
                _write_entry(cfg, name, "failed", {**entry, "at": _now()})
        raise
    _note_history(lambda: _write_entry(cfg, name, "done", {**entry, "at": _now()}))
    return _info(mv)


def _note_history(write: Callable[[], object]) -> None:
    """A completion or an outside note is bookkeeping: once the alias moved, failing to write it must not
    fail the move (the intent already says the move is loraflow's; the next reconcile notes UI moves)."""
    try:
        write()
    except Exception as err:  # noqa: BLE001 - bookkeeping after the move: never fails the move
        print(f"warning: alias history not updated: {type(err).__name__}: {err}", file=sys.stderr, flush=True)


def ensure_webhook(cfg: RegistryConfig, name: str, url: str, secret: str) -> str:
    """Create (or update) the registry webhook ``name`` that tells ``url`` about alias moves; returns its
    id. Only an MLflow tracking server delivers webhooks (and only to private addresses when it runs with
    MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true)."""
    c = client(cfg)
    events = ["model_version_alias.created", "model_version_alias.deleted"]
    for hook in c.list_webhooks():
        if hook.name == name:
            c.update_webhook(hook.webhook_id, url=url, events=events, secret=secret, status="ACTIVE")
            return hook.webhook_id
    return c.create_webhook(name=name, url=url, events=events, secret=secret,
                            description="loraflow serve: follow the champion alias").webhook_id


def set_version_tag(cfg: RegistryConfig, name: str, version: int, key: str, value: str) -> None:
    call(cfg, f"tag {name} v{version} {key}", lambda: client(cfg).set_model_version_tag(name, str(version), key, value))


def rollback(cfg: RegistryConfig, name: str) -> VersionInfo:
    """Move the alias back to the version it held before its current one, by the recorded history (moves
    made in the MLflow UI included: they are reconciled first), skipping versions serving rejected."""
    current = get_alias(cfg, name)
    if current is None:
        raise LookupError(f"model {name!r} has no @{cfg.alias} to roll back from")
    moves = reconcile_history(cfg, name)
    # Walk back through the moves: each one's "from" is a candidate, newest first, except versions a
    # rollback already left (a second rollback steps further back instead of undoing the first).
    seen = {current.version} | {m.get("from") for m in moves if str(m.get("by", "")).startswith("loraflow rollback")}
    for move in reversed(moves):
        target = move.get("from")
        if target is None or target in seen:
            continue
        seen.add(target)
        status = call(cfg, f"read {name} v{target}",
                      lambda t=target: client(cfg).get_model_version(name, str(t)).tags).get("serving_status", "")
        if status.startswith("rejected"):
            continue
        return promote(cfg, name, int(target), expected=current.version, by=f"loraflow rollback from v{current.version}")
    raise LookupError(f"model {name!r}: no earlier {cfg.alias} in its alias history to roll back to")


class AdapterUnavailable(OSError):
    """The artifact store did not give back the version's adapter (missing or different files)."""


def download_adapter(cfg: RegistryConfig, info: VersionInfo, dst: Path) -> Path:
    """Materialise a version's adapter under ``dst/<name>-v<version>`` (reused when already there)."""
    import mlflow.artifacts

    target = dst / f"{info.name}-v{info.version}"
    if (target / "adapter_config.json").is_file() and (
        not info.tags.get("adapter_sha256") or dir_sha256(target) == info.tags["adapter_sha256"]
    ):
        return target
    client(cfg)
    with tempfile.TemporaryDirectory(dir=dst.parent if dst.parent.exists() else None) as tmp:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{info.name}/{info.version}",
                                                       dst_path=tmp))
        # A storage that lost or hides the files answers with an empty folder, not an error: check what came.
        weights = [f for f in got.glob("adapter_model.*") if f.stat().st_size]
        if not (got / "adapter_config.json").is_file() or not weights:
            raise AdapterUnavailable(f"{info.name} v{info.version}: the artifact store returned no adapter for "
                                     f"models:/{info.name}/{info.version} (storage unavailable?)")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            import shutil
            shutil.rmtree(target)
        got.rename(target)
    return target


def log_report(cfg: RegistryConfig, run_name: str, files: dict[str, Path], metrics: dict[str, float],
               tags: dict[str, str]) -> str:
    """Log a monitoring report (HTML, JSON) as its own MLflow run."""
    import mlflow

    c = client(cfg)
    with mlflow.start_run(experiment_id=experiment_id(c, cfg), run_name=run_name, tags=tags) as run:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        for name, path in files.items():
            mlflow.log_artifact(str(path), name)
        return run.info.run_id


def bases_in_use(cfg: RegistryConfig, name: str) -> set[str]:
    """The base weights digests that ``name``'s versions holding an alias, named anywhere in the alias
    history, or with a promotion pending, were trained on: what the base store must keep (a rollback, a
    restart or a completed promotion serves them). Raises
    ``RegistryUnavailable`` when it cannot read: never "nothing in use"."""
    rm = call(cfg, f"read {name}", lambda: client(cfg).get_registered_model(name))
    versions = {int(v) for v in (getattr(rm, "aliases", None) or {}).values()}
    pending = call(cfg, f"search {name}'s pending promotions", lambda: client(cfg).search_model_versions(
        f"name = '{name}' and tags.promotion = 'pending'"))
    versions |= {int(mv.version) for mv in pending}
    # Every entry's versions, moves in flight included: the registered model already read holds the tags.
    versions |= {int(x) for e in _entries(rm.tags or {}, cfg.alias) for x in (e.get("from"), e.get("to"))
                 if x is not None}
    shas = (get_version(cfg, name, v).tags.get("base_weights_sha256") for v in sorted(versions))
    return {sha for sha in shas if sha}


def log_run_file(cfg: RegistryConfig, run_id: str, path: Path, folder: str) -> None:
    """Add ``path`` to a finished run's artifacts under ``folder`` (a new file: nothing logged is rewritten)."""
    call(cfg, f"log {path.name} to run {run_id}", lambda: client(cfg).log_artifact(run_id, str(path), folder))


def set_run_tag(cfg: RegistryConfig, run_id: str, key: str, value: str) -> None:
    client(cfg).set_tag(run_id, key, value)
