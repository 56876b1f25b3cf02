"""From an evaluated candidate to a registered, possibly promoted, model version, as one transaction.

``release`` runs under the model's retrain lock (the caller holds it) and is safe to re-run at any point:

1. The adapter already registered? Its version's tags say how far the earlier run got: the alias already
   on it (mark it done), a passed gate whose alias move never happened (complete it, compare-and-set
   against the alias the gate saw; re-gate if the alias moved since), or a failed gate (nothing to do).
2. Otherwise: gate (candidate vs the champion re-evaluated on today's eval split, or vs the base model),
   log the run (or reuse the run an interrupted attempt logged), register the version with lineage tags,
   the decision and the model card (``promotion: pending`` when the gate passed, ``held`` otherwise).
3. Move the alias only if it still points where it pointed when the gate ran; if a person moved it
   meanwhile, gate again against the new champion (never overwrite their choice blindly). Then tag
   ``promotion: done``.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from pipeline import registry
from pipeline.config import Params
from pipeline.hashing import dir_sha256, file_sha256
from pipeline.io import first_prompts, read_json, write_json
from pipeline.layout import CURATED_TAG, augmented_file, clean_split, curated_count
from pipeline.modeling import BaseMissing, base_config_sha256, base_dir_for, base_weights_sha256
from pipeline.release.card import model_card
from pipeline.release.gate import Decision, ModelScore, decide
from pipeline.release.lineage import dvc_lock_hashes, git_commit, params_sha256

SERVING_TAGS = ("task_config", "smoke_prompts")  # version tags only: run tags are capped at 8,000 chars
NO_VERSION = "none"
# Scores an adapter on today's eval split (per-example details, as the evaluate stage records them). The
# composition root supplies it (pipeline/stages.py ``rescorer``): evaluation is another stage's business.
Rescore = Callable[[Path, Path], dict]  # (adapter folder, the base folder it was trained on) -> details


def candidate_score(p: Params) -> tuple[ModelScore, ModelScore]:
    """The candidate's and the base model's scores, as the evaluate stage recorded them."""
    details = read_json(Path(p.evaluate.out_dir) / "details.json")
    privacy = read_json(Path(p.train.out_dir) / "train_metrics.json").get("privacy")
    return (replace(ModelScore.from_details("candidate", details["candidate"]), privacy=privacy),
            ModelScore.from_details("base", details["base"]))


def champion_score(p: Params, champion: registry.VersionInfo, rescore: Rescore) -> tuple[ModelScore | None, str]:
    """Re-evaluate the champion on the current eval split, on the base it was trained on (paired with the
    candidate's outcomes). (None, why) when that base is not on this machine (pipeline.modeling.base_dir_for)
    or the version does not name its base."""
    want = champion.tags.get("base_weights_sha256")
    if not want:
        return None, f"champion v{champion.version} does not record its base (base_weights_sha256)"
    try:
        base_dir = base_dir_for(Path(p.base.out_dir), Path(p.base.store_dir), want)
    except BaseMissing as e:
        return None, f"champion v{champion.version} cannot be re-scored: {e}"
    adapter = registry.download_adapter(p.registry, champion, Path(p.serve.adapters_dir))
    res = rescore(adapter, base_dir)
    return ModelScore.from_details(f"champion v{champion.version}", res), ""


def gate(p: Params, candidate: ModelScore, base: ModelScore,
         rescore: Rescore) -> tuple[Decision, registry.VersionInfo | None]:
    """The decision and the champion it was taken against (what the alias must still point at). The
    champion is re-scored on its own base (bases are kept by content), so a candidate on a rebuilt base is
    still compared with the champion, not only with the base model."""
    champion = registry.get_alias(p.registry, p.project.name)
    reference, why = champion_score(p, champion, rescore) if champion else (None, "")
    if reference is not None:
        return decide(candidate, reference, p.gate, p.gate_metric, p.guardrail_metrics, base=base), champion
    decision = decide(candidate, base, p.gate, p.gate_metric, p.guardrail_metrics)
    if champion is not None:
        decision = replace(decision, reasons=decision.reasons + [f"{why}: judged against the base model"])
    return decision, champion


def lineage_tags(p: Params) -> dict[str, str]:
    base_dir = Path(p.base.out_dir)
    # The base the adapter was trained on, as training recorded it (the one in base.out_dir otherwise).
    meta_file = Path(p.train.out_dir) / "train_meta.json"
    meta = read_json(meta_file) if meta_file.is_file() else {}
    commit, dirty = git_commit()
    tags = {f"dvc.{k}": v for k, v in dvc_lock_hashes().items()}
    tags.update({
        "git_commit": commit,
        "params_sha256": params_sha256(p.model_dump()),
        "base_model": p.base.model,
        "base_sha256": meta.get("base_config_sha256") or base_config_sha256(base_dir),
        "base_weights_sha256": meta.get("base_weights_sha256") or base_weights_sha256(base_dir),
        "train_data_sha256": file_sha256(augmented_file(p)),
        "eval_data_sha256": file_sha256(clean_split(p, "eval")),
        # The curated data version this was trained on: a drift-triggered retrain waits for new records.
        CURATED_TAG: str(curated_count(p)),
        "task": p.task.name,
        "task_kind": p.task.kind,
        # Serving reads these: the task's generation settings and parser, and held-out prompts (sanitized,
        # so redacted) for the smoke test a version must pass before its name is routed to it.
        "task_config": p.task.model_dump_json(),
        "smoke_prompts": json.dumps(first_prompts(clean_split(p, "eval")), ensure_ascii=False),
    })
    if dirty:
        tags["git_dirty_files"] = ", ".join(dirty)[:500]
    return tags


def gate_settings_sha(p: Params) -> str:
    """The gate section's digest: a version's decision stands only under the settings it was taken with."""
    settings = p.gate.model_dump(mode="json")
    if not settings["skip_uncomputable"]:  # a field added later: at its default, the digest is what it was
        del settings["skip_uncomputable"]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def decision_tags(decision: Decision, champion: registry.VersionInfo | None, settings: str) -> dict[str, str]:
    iv = decision.interval
    return {
        "gate_promote": str(decision.promote).lower(),
        "gate_settings": settings,
        "gate_reference": decision.reference,
        # Compare-and-set: the alias must still point here when the promotion happens.
        "gate_alias_version": str(champion.version) if champion else NO_VERSION,
        "gate_metric": decision.metric,
        "gate_interval": f"{iv.mean:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}] {iv.confidence:.0%} n={iv.n}" if iv else "",
        "gate_failed": ",".join(k for k, ok in decision.checks.items() if not ok),
        "gate_slices": json.dumps({k: {"n": v["n"], "candidate": v["candidate"], "reference": v["reference"],
                                       "diff": v["interval"]["mean"], "low": v["interval"]["low"],
                                       "high": v["interval"]["high"]} for k, v in decision.slices.items()}),
        "promotion": "pending" if decision.promote else "held",
    }


def _card(p: Params, decision: Decision, candidate: ModelScore, base: ModelScore,
          champion: registry.VersionInfo | None) -> tuple[dict[str, str], str, dict, dict]:
    """The version's tags and model card for ``decision``, written to reports/README.md and reports/gate.json;
    returns (tags, card, eval metrics, train metrics)."""
    adapter_dir = Path(p.train.out_dir)
    train_metrics = read_json(adapter_dir / "train_metrics.json")
    n = len(next(iter(candidate.per_example.values()), []))
    eval_metrics = {s.name: {**s.metrics, "tokens_per_s": s.speed.get("tokens_per_s"), "n": n}
                    for s in (base, candidate)}
    privacy = train_metrics.get("privacy") or {}
    tags = {**lineage_tags(p), "adapter_sha256": dir_sha256(adapter_dir),
            **decision_tags(decision, champion, gate_settings_sha(p)),
            "privacy_epsilon": "none" if not privacy else "inf" if privacy.get("epsilon") is None else str(privacy["epsilon"])}
    data_card = Path(p.sanitize.out_dir, "train", "data_card.md").read_text(encoding="utf-8")
    card = model_card(p, eval_metrics=eval_metrics, decision=decision.to_dict(), data_card=data_card,
                      lineage={k: v for k, v in tags.items() if k not in SERVING_TAGS and not k.startswith("gate_")
                               and k != "promotion"},
                      train_metrics=train_metrics, probes=candidate.leak or {})
    reports = Path("reports")
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "README.md").write_text(card, encoding="utf-8")
    write_json(reports / "gate.json", {**decision.to_dict(), "candidate_leak": candidate.leak})
    return tags, card, eval_metrics, train_metrics


def _redecided(p: Params, info: registry.VersionInfo, decision: Decision, candidate: ModelScore,
               base: ModelScore, champion: registry.VersionInfo | None) -> None:
    """A registered version gated again: its decision tags, and the card the MLflow UI shows, say the new
    decision. The card inside the run's adapter artifact stays as logged (what was registered)."""
    _, card, _, _ = _card(p, decision, candidate, base, champion)
    settings = gate_settings_sha(p)
    # The new decision beside the first (never over it: the run's artifacts are its record), with the
    # settings it was taken under; the version's ``gate_decision`` tag, set last, names the one that stands.
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    decided = Path("reports") / f"gate-{stamp}-{settings}.json"
    write_json(decided, {**decision.to_dict(), "candidate_leak": candidate.leak, "at": stamp,
                         "gate_settings": p.gate.model_dump(mode="json"),
                         "champion": champion.version if champion else None})
    registry.log_run_file(p.registry, info.run_id, decided, "gate")
    _tag(p, info.version, **decision_tags(decision, champion, settings), gate_decision=f"gate/{decided.name}")
    registry.describe_version(p.registry, p.project.name, info.version, card, info.run_id)


def register_candidate(p: Params, decision: Decision, candidate: ModelScore, base: ModelScore,
                       champion: registry.VersionInfo | None) -> registry.VersionInfo:
    adapter_dir = Path(p.train.out_dir)
    tags, card, eval_metrics, train_metrics = _card(p, decision, candidate, base, champion)
    adapter_sha = tags["adapter_sha256"]
    card_path, decision_path = Path("reports/README.md"), Path("reports/gate.json")
    run_id = registry.find_run_by_adapter(p.registry, adapter_sha)  # an interrupted attempt logged it
    if run_id is None:
        run_id = registry.log_candidate(
            p.registry, run_name=f"retrain-{adapter_sha[:8]}", params=p.model_dump(),
            adapter_dir=adapter_dir, train_metrics=train_metrics, eval_metrics=eval_metrics,
            artifacts={"reports": card_path, "gate": decision_path,
                       "data": Path(p.sanitize.out_dir, "train", "report.json"),
                       "data_eval": Path(p.sanitize.out_dir, "eval", "report.json"),
                       "augment": Path(p.augment.out_dir, "report.json"),
                       "eval": Path(p.evaluate.out_dir, "details.json"),
                       "curate": Path("reports/curate.json")},
            tags={k: v for k, v in tags.items() if not k.startswith("dvc.") and k not in SERVING_TAGS},
            adapter_texts={"README.md": card},
        )
    return registry.register(p.registry, p.project.name, run_id, tags, card)


def _tag(p: Params, version: int, **tags: str) -> None:
    for k, v in tags.items():
        registry.set_version_tag(p.registry, p.project.name, version, k, v)


def _expected(tags: dict[str, str]) -> int | None:
    raw = tags.get("gate_alias_version", NO_VERSION)
    return None if raw == NO_VERSION else int(raw)


def release(p: Params, candidate: ModelScore, base: ModelScore, rescore: Rescore,
            say: Callable[[str], None] = print, max_regates: int = 3) -> dict:
    """Register the candidate and move the alias if its gate passes; resumable (see the module doc).
    The caller holds the retrain lock."""
    name, alias = p.project.name, p.registry.alias
    existing = registry.find_version_by_adapter(p.registry, name, dir_sha256(Path(p.train.out_dir)))
    champion = registry.get_alias(p.registry, name)
    if existing is not None:
        state = existing.tags.get("promotion", "")
        if champion is not None and champion.version == existing.version:
            if state != "done":
                say(f"v{existing.version} already holds @{alias}: completing the earlier run's bookkeeping")
                _tag(p, existing.version, promotion="done")
            return _summary(existing.version, False, None, True, "already registered and holding the alias")
        settings = gate_settings_sha(p)
        changed = existing.tags.get("gate_settings", settings) != settings  # versions from before: as decided
        if existing.tags.get("gate_promote") != "true" and changed:
            # A person changed the gate (a guardrail, the required improvement): the same scores, decided
            # again under today's settings, instead of "no new data" until something else changes.
            say(f"v{existing.version} failed its gate under other gate settings: gating it again under today's")
            decision, gated_against = _gate_and_say(p, candidate, base, rescore, say, "gate")
            _redecided(p, existing, decision, candidate, base, gated_against)
            if not decision.promote:
                return _summary(existing.version, False, decision, False,
                                "gate failed again under the changed gate settings", regated=True)
            info, expected, newly, regated = existing, (gated_against.version if gated_against else None), False, True
        elif existing.tags.get("gate_promote") != "true" or state != "pending":
            return _summary(existing.version, False, None, False,
                            f"already registered as v{existing.version}; its gate decided "
                            f"{'promote' if existing.tags.get('gate_promote') == 'true' else 'keep the champion'}")
        else:
            say(f"v{existing.version} passed its gate but @{alias} never moved to it: completing the promotion")
            info, decision, expected = existing, None, _expected(existing.tags)
            newly = regated = False
    else:
        decision, gated_against = _gate_and_say(p, candidate, base, rescore, say, "gate")
        info = register_candidate(p, decision, candidate, base, gated_against)
        say(f"registered {name} v{info.version} ({'gate passed' if decision.promote else 'gate failed'})")
        if not decision.promote:
            return _summary(info.version, True, decision, False, "gate failed")
        expected, newly, regated = (gated_against.version if gated_against else None), True, False
    for _ in range(max_regates + 1):
        try:
            registry.promote(p.registry, name, info.version, expected=expected, by="loraflow retrain (gate passed)")
            _tag(p, info.version, promotion="done")
            say(f"{name}@{alias} -> v{info.version}")
            return _summary(info.version, newly, decision, True, "promoted", regated)
        except registry.AliasMoved as moved:
            if moved.current == info.version:  # someone promoted it meanwhile: nothing left to do
                _tag(p, info.version, promotion="done")
                return _summary(info.version, newly, decision, True, "promoted meanwhile by someone else")
            say(f"{moved}: moved during this run; gating v{info.version} again against the new champion")
            decision, gated_against = _gate_and_say(p, candidate, base, rescore, say, "gate (again)")
            _redecided(p, info, decision, candidate, base, gated_against)
            if not decision.promote:
                return _summary(info.version, newly, decision, False, "gate failed against the new champion")
            expected = gated_against.version if gated_against else None
    raise RuntimeError(f"{name}@{alias} kept moving during this run ({max_regates} re-gates); v{info.version} "
                       "stays registered with promotion pending; run again once the alias is settled")


def publish_current_base(p: Params) -> Path | None:
    """The current base into the store, if it is not there (a base restored by DVC, or built before the store
    existed); None without a base. Never writes into ``base.out_dir`` (a DVC output)."""
    from pipeline.modeling import base_present, publish_base

    current = Path(p.base.out_dir)
    return publish_base(current, Path(p.base.store_dir), beside=False) if base_present(current) else None


def prune_bases(p: Params, say: Callable[[str], None] = print) -> list[str]:
    """Remove from the base store (``base.store_dir``) every base that no version holding an alias, named in
    the alias history or with a promotion pending was trained on, that no store link names (``current``,
    ``serving``), and that is over a day old (one being trained on may not be registered yet). A registry
    that cannot be read prunes nothing; a failure to remove is reported, never fails the caller."""
    from pipeline.modeling import prune_bases as prune

    try:  # the current base into the store (DVC may have restored it instead of building it), and kept
        current = publish_current_base(p)
    except OSError as e:
        say(f"base store not updated: {e}")
        return []
    keep: set[str] = {current.name} if current is not None else set()
    for name in dict.fromkeys([p.project.name, *p.serve.models]):  # every model this project serves
        try:
            keep |= registry.bases_in_use(p.registry, name)
        except Exception as e:  # noqa: BLE001 - "could not read" is never "nothing in use"
            if not registry.absent(e):  # absent: no registered model of that name refers to any base
                say(f"base store not pruned: {type(e).__name__}: {e}")
                return []
    try:
        removed = prune(Path(p.base.store_dir), keep)
    except OSError as e:
        say(f"base store not pruned: {e}")
        return []
    for folder in removed:
        say(f"base store: removed {folder.name[:12]} (no registered version refers to it)")
    return [f.name for f in removed]


def _gate_and_say(p: Params, candidate: ModelScore, base: ModelScore, rescore: Rescore,
                  say: Callable[[str], None], label: str) -> tuple[Decision, registry.VersionInfo | None]:
    decision, gated_against = gate(p, candidate, base, rescore)
    for reason in decision.reasons:
        say(f"{label}: {reason}")
    return decision, gated_against


def _summary(version: int, newly: bool, decision: Decision | None, promoted: bool, note: str,
             regated: bool = False) -> dict:
    return {"registered_version": version, "newly_registered": newly, "promoted": promoted, "note": note,
            "regated": regated,
            "decision": decision.to_dict() if decision else {"promote": promoted, "reasons": [note]}}
