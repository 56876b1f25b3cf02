"""The compliance dossier of one registered version: one self-contained HTML document and its Markdown
twin, filled only from what the registry recorded (the version's tags, its run's parameters, metrics and
report artifacts, the alias history) and the endpoint's serving log.

    loraflow dossier <model> [version]

Headings follow the EU AI Act's Annex IV ("Technical documentation referred to in Article 11(1)",
Regulation (EU) 2024/1689), sections 1-9. What loraflow cannot know (the provider's risk management
system, harmonised standards, the declaration of conformity) is marked for the provider to complete,
never filled with boilerplate. The sources hold no raw personal data or canary value: reports carry
counts and redacted text, canaries only their sha256 prefixes.
"""

from __future__ import annotations

import html
import json
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline import registry
from pipeline.config import RegistryConfig
from pipeline.release.card import privacy_line

TEMPLATE = "EU AI Act (Regulation (EU) 2024/1689), Annex IV: technical documentation (Article 11(1))"
PROVIDER = "_To be completed by the provider: outside what loraflow records._"
# Run artifacts the dossier reads (name in the run -> file): every one is optional (older versions lack some).
ARTIFACTS = {
    "data": "data/report.json", "data_eval": "data_eval/report.json", "augment": "augment/report.json",
    "gate": "gate/gate.json", "eval": "eval/details.json", "curate": "curate/curate.json",
    "train_metrics": "adapter/train_metrics.json", "train_meta": "adapter/train_meta.json",
}


@dataclass
class Facts:
    """Everything the dossier states, as read from the registry (and the serving log)."""

    name: str
    version: int
    created: str
    run_id: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    reports: dict[str, dict]
    history: list[dict]
    alias: str
    champion: int | None
    serving: list[dict] = field(default_factory=list)
    serving_log: str | None = None


def _download_reports(cfg: RegistryConfig, run_id: str, decision: str = ARTIFACTS["gate"]) -> dict[str, dict]:
    """The run's report artifacts that exist; ``decision``: the gate decision that stands (the version's
    ``gate_decision`` tag after a re-gate, else the one logged at registration). A listing that fails
    raises (never "absent"); a decision the tag names that is not there is an error, never the first one."""
    import mlflow.artifacts

    c = registry.client(cfg)
    present: set[str] = set()
    for folder in sorted({a.split("/")[0] for a in ARTIFACTS.values()}):
        listed = registry.call(cfg, f"list artifacts {folder} of run {run_id}",
                               lambda f=folder: c.list_artifacts(run_id, f))
        present |= {f.path for f in listed}
    wanted = {**ARTIFACTS, "gate": decision}
    if decision != ARTIFACTS["gate"] and decision not in present:
        raise LookupError(f"run {run_id}: the gate decision {decision} named by the version's gate_decision tag "
                          "is not among its artifacts")
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, path in wanted.items():
            if path not in present:
                continue
            local = registry.call(cfg, f"download {path} of run {run_id}", lambda p=path: mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=p, dst_path=tmp))
            out[key] = json.loads(Path(local).read_text(encoding="utf-8"))
    return out


def serving_periods(log: Path | None, name: str, version: int) -> list[dict]:
    """When ``version`` of ``name`` answered traffic: from each ``served`` line to the next line of that
    model that ended it (another version served, or the endpoint stopped); open periods have no end."""
    if log is None or not log.is_file():
        return []
    periods: list[dict] = []
    current: dict | None = None
    with open(log, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            try:
                ev = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{log}:{n}: not a JSON line ({err.msg})") from None
            if ev.get("model") != name:
                continue
            ends = ev["event"] == "stopped" or (ev["event"] == "served" and ev.get("version") != version)
            if current is not None and ends:
                current["until"] = ev["at"]
                current["ended_by"] = ev["event"] if ev["event"] == "stopped" else f"v{ev['version']} served"
                periods.append(current)
                current = None
            if ev["event"] == "served" and ev.get("version") == version and current is None:
                current = {"from": ev["at"], "until": None, "ended_by": None}
            if ev["event"] == "rejected" and ev.get("version") == version:
                periods.append({"from": ev["at"], "until": ev["at"], "ended_by": f"rejected: {ev.get('reason', '')}"})
    if current is not None:
        periods.append(current)
    return periods


def gather(cfg: RegistryConfig, name: str, version: int | None = None, serving_log: Path | None = None) -> Facts:
    """Read everything the dossier states about ``name`` v``version`` (default: the alias's version)."""
    champion = registry.get_alias(cfg, name)
    if version is None:
        if champion is None:
            raise LookupError(f"{name} has no @{cfg.alias}: name the version (loraflow dossier {name} <version>)")
        version = champion.version
    c = registry.client(cfg)
    try:
        mv = registry.call(cfg, f"read {name} v{version}", lambda: c.get_model_version(name, str(version)))
    except Exception as err:  # noqa: BLE001 - only the registry's "no such version" is a LookupError
        if registry.absent(err):
            raise LookupError(f"{name} v{version} is not registered") from None
        raise
    run = registry.call(cfg, f"read run {mv.run_id}", lambda: c.get_run(mv.run_id))
    return Facts(
        name=name, version=int(version),
        created=datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc).isoformat(timespec="seconds"),
        run_id=mv.run_id, tags=dict(mv.tags or {}), params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        reports=_download_reports(cfg, mv.run_id, (mv.tags or {}).get("gate_decision", ARTIFACTS["gate"])),
        history=registry.history(cfg, name), alias=cfg.alias,
        champion=champion.version if champion else None,
        serving=serving_periods(serving_log, name, int(version)), serving_log=str(serving_log) if serving_log else None)


def promotion_path(by: str) -> str:
    """Which path moved the alias, from the history's ``by``."""
    if by.startswith("loraflow retrain"):
        return "gate (automatic, after the gate passed)"
    if by.startswith("loraflow rollback"):
        return "CLI (loraflow rollback)"
    if by.startswith("loraflow serve"):
        return "serving (automatic: the version it left was rejected)"
    if by.startswith("outside loraflow"):
        return "MLflow UI or API (a person)"
    if by.startswith("loraflow promote"):
        return "CLI (loraflow promote)"
    return by


# --- the document, as sections of blocks, rendered to Markdown and to HTML ------------------------------

def _kv(rows: list[tuple[str, object]]) -> dict:
    return {"kv": [(k, "-" if v is None or v == "" else str(v)) for k, v in rows]}


def _table(head: list[str], rows: list[list[object]]) -> dict:
    return {"table": (head, [["-" if c is None else str(c) for c in r] for r in rows])}


def _text(s: str) -> dict:
    return {"text": s}


def _fmt(v: object, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def sections(f: Facts) -> list[tuple[str, list[dict]]]:
    t, prm, m, rep = f.tags, f.params, f.metrics, f.reports
    task = json.loads(t["task_config"]) if t.get("task_config") else {}
    tm = rep.get("train_metrics") or {}
    meta = rep.get("train_meta") or {}
    gate = rep.get("gate") or {}
    decision_checks = gate.get("checks") or {}
    leak = gate.get("candidate_leak") or (rep.get("eval", {}).get("candidate", {}).get("leak") or {})
    holds = f.champion == f.version

    def setting(key: str):
        """A gate setting the decision that stands was taken under (a re-gate logs its own; the first
        decision's are the run's parameters)."""
        return (gate.get("gate_settings") or {}).get(key, prm.get(f"gate.{key}"))

    general = [
        _kv([("model", f.name), ("version", f.version), ("registered", f.created), ("MLflow run", f.run_id),
             ("task", f"{t['task']} (answers of kind {t.get('task_kind')})" if t.get("task") else None), ("base model", t.get("base_model")),
             ("adapter sha256", t.get("adapter_sha256")), ("git commit", t.get("git_commit")),
             (f"holds @{f.alias}", "yes" if holds else f"no (@{f.alias} is v{f.champion})" if f.champion else "no"),
             ("serving status", t.get("serving_status", "never served")),
             ("documentation template", TEMPLATE)]),
        _text("**Intended purpose.** " + (task.get("description") or f"The `{t.get('task')}` task.")),
        _text("**Known limitations.** " + (task.get("limitations") or "Evaluated only on the held-out split below.")),
    ]

    data_rows = []
    for split in ("data", "data_eval"):
        r = rep.get(split)
        if r:
            q = r.get("quarantined", {})
            d = r.get("duplicates", {})
            data_rows.append([("train" if split == "data" else "eval"), r.get("read"), r.get("kept"), q.get("total"),
                              ", ".join(f"{k} {v}" for k, v in sorted(q.get("by_reason", {}).items())) or "none",
                              f"exact {d.get('exact', 0)}, near {d.get('near', 0)}, contamination {d.get('contamination', 0)}",
                              ", ".join(f"{k} {v}" for k, v in sorted(r.get("redactions", {}).get("by_type", {}).items())) or "none"])
    aug = rep.get("augment") or {}
    cur = rep.get("curate") or {}
    total = aug.get("total") or 0
    # Data and model outputs; the code dependencies are pinned by the git commit above.
    dvc = sorted((k[4:], v) for k, v in t.items() if k.startswith("dvc.") and ":pipeline/" not in k)
    data = [
        _kv([("training sources", prm.get("data.train")), ("held-out sources", prm.get("data.eval")),
             ("training data sha256", t.get("train_data_sha256")), ("eval data sha256", t.get("eval_data_sha256"))]),
        _table(["split", "read", "kept", "quarantined", "quarantined by reason", "duplicates removed",
                "PII redactions by type"], data_rows) if data_rows else _text("No sanitize report recorded."),
        _table(["DVC output", "hash"], dvc) if dvc else _text("No DVC hashes recorded (dvc.lock absent at release)."),
        _kv([("training records", total or None),
             ("real", aug.get("real")),
             ("synthetic", f"{aug.get('synthetic', 0)} ({aug.get('synthetic', 0) / total:.1%}; generators "
                           f"{aug.get('by_generator') or 'none'}; each rewrites one real record's last user turn, "
                           "answer unchanged)" if total else None),
             ("curated from served traffic", f"{aug.get('curated', 0)} ({aug.get('curated', 0) / total:.1%}); "
                                             f"curated_records tag {t.get('curated_records', '0')}" if total else None),
             ("curated provenance (last cut)", _curate_summary(cur)),
             ("generic rows mixed in", tm.get("generic_samples")),
             ("canary rows planted (probe only)", f"{tm.get('canary_rows', 0)}; sha256 prefixes "
                                                  f"{', '.join(tm.get('canaries') or []) or 'none'}")]),
    ]

    trl = meta.get("trl") or {}
    training = [
        _kv([("method", prm.get("train.method")), ("adapter", prm.get("train.adapter")),
             ("rank / alpha / dropout", f"{prm.get('train.lora_r')} / {prm.get('train.lora_alpha')} / "
                                        f"{prm.get('train.lora_dropout')}"),
             ("target modules", prm.get("train.target_modules")), ("packing", prm.get("train.packing")),
             ("base weights sha256", t.get("base_weights_sha256")),
             ("continued from", (tm.get("continual") or {}).get("from") or "no (trained from scratch)"),
             ("EWC lambda", (tm.get("continual") or {}).get("ewc_lambda")),
             ("differential privacy", privacy_line(tm.get("privacy"))),
             ("steps", tm.get("steps")), ("training rows", tm.get("train_samples")),
             ("duration", f"{tm.get('duration_s')} s on {tm.get('device_name') or tm.get('device')}")]),
        _table(["TRL setting", "value"], sorted((k, json.dumps(v)) for k, v in trl.items())) if trl else
        _text("TRL settings: see the run's parameters."),
    ]

    names = sorted({k.split("_", 1)[1] for k in m if k.startswith("candidate_")} - {"n"})
    interval = gate.get("interval") or {}
    slices = gate.get("slices") or {}
    canaries = leak.get("canaries") or []
    evaluation = [
        _table(["metric", "candidate", "base"], [[n, _fmt(m.get(f"candidate_{n}")), _fmt(m.get(f"base_{n}"))]
                                                for n in names]),
        _kv([("held-out examples", int(m["candidate_n"]) if "candidate_n" in m else None),
             ("gate metric", gate.get("metric")), ("reference", gate.get("reference")),
             ("paired difference", f"{interval['mean']:+.4f}, {interval['confidence']:.0%} CI [{interval['low']:+.4f}, "
                                   f"{interval['high']:+.4f}], n={interval['n']} (paired bootstrap, "
                                   f"{interval['samples']} resamples, seed {interval['seed']})" if interval else None),
             ("forgetting (generic next-token accuracy)", _forgetting(rep.get("eval") or {})),
             ("canary exposure", f"max {max((c.get('exposure', 0) for c in canaries), default=0):.2f} bits over "
                                 f"{len(canaries)} canaries, {sum(bool(c.get('completed')) for c in canaries)} "
                                 "completed from their prefix" if canaries else "no canaries planted"),
             ("PII values in generated answers", f"{leak.get('pii_hits', 0)} in {leak.get('answers_scanned', 0)} answers"
                                                 if leak else None)]),
        _table(["slice", "n", "candidate", "reference", "difference [CI]"],
               [[k, v["n"], _fmt(v.get("candidate")), _fmt(v.get("reference")),
                 f"{v['interval']['mean']:+.4f} [{v['interval']['low']:+.4f}, {v['interval']['high']:+.4f}]"]
                for k, v in slices.items()]) if slices else _text("One eval slice (no curated traffic held out)."),
    ]
    gate_sec = [
        _text(f"**Decision: {'promote' if gate.get('promote') else 'keep the champion'}** "
              f"(tag gate_promote={t.get('gate_promote')}, promotion={t.get('promotion')})."),
        _table(["check", "result"], [[k, "pass" if ok else "FAIL"] for k, ok in decision_checks.items()]),
        {"list": gate.get("reasons") or []},
    ]
    moves = [mv for mv in f.history if f.version in (mv.get("to"), mv.get("from"))]
    changes = [
        _table(["when (UTC)", "alias move", "by", "path"],
               [[mv.get("at"), f"{_v(mv.get('from'))} -> {_v(mv.get('to'))}", mv.get("by"), promotion_path(str(mv.get("by", "")))]
                for mv in moves]) if moves else _text(f"The alias @{f.alias} never pointed at v{f.version}."),
        _table(["served from (UTC)", "until", "ended by"],
               [[p["from"], p["until"] or "still serving", p["ended_by"]] for p in f.serving]) if f.serving else
        _text(f"No serving period recorded{' in ' + f.serving_log if f.serving_log else ''}."),
    ]
    price = prm.get("train.gpu_hour_price")
    gpu_hours = tm.get("gpu_hours", m.get("train_gpu_hours"))
    cost = [_kv([("GPU-hours", gpu_hours), ("price per GPU-hour", price),
                 ("cost (GPU-hours x price)", tm.get("estimated_cost", m.get("train_estimated_cost"))),
                 ("wall time", f"{tm.get('duration_s')} s ({tm.get('device')}; CPU time is not priced)")])]
    return [
        ("1. General description of the AI system", general),
        ("2. Elements of the system and its development: data (2(d))", data),
        ("2. Elements of the system and its development: training method and design choices (2(a), 2(b))", training),
        ("2. Validation and testing: metrics, test results (2(g))", evaluation),
        ("3. Monitoring, functioning and control: the release gate", gate_sec),
        ("4. Appropriateness of the performance metrics", [_kv([
            ("gate metric", gate.get("metric")), ("minimum improvement (lower CI bound)", setting("min_improvement")),
            ("confidence", setting("confidence")), ("minimum examples", setting("min_examples")),
            ("minimum valid answers", setting("min_valid")), ("guardrail tolerance", setting("guardrail_tolerance")),
            ("forgetting tolerance", setting("forgetting_tolerance")), ("max canary exposure", setting("max_exposure")),
            ("max epsilon", "not required" if setting("max_epsilon") in (None, "None") else setting("max_epsilon")),
            ("skipped when not computable", ", ".join(setting("skip_uncomputable") or []) or "none")])]),
        ("5. Risk management system (Article 9)", [_text(
            "Controls loraflow applied to this version: PII redaction before training, quarantine of bad records, "
            "eval contamination checks, the leak probe (canaries, PII in answers), the forgetting check and the "
            "statistical gate above. " + PROVIDER)]),
        ("6. Changes through the lifecycle: approvals, alias history, serving periods", changes),
        ("7. Harmonised standards applied", [_text(PROVIDER)]),
        ("8. EU declaration of conformity", [_text(PROVIDER)]),
        ("9. Post-market monitoring and cost", [_kv([
            ("drift monitoring", f"Evidently, drift share threshold {prm.get('monitor.drift_share')}, minimum "
                                 f"{prm.get('monitor.min_requests')} requests"),
            ("feedback", "POST /v1/feedback, curated into the next data version (curate stage)")]), *cost]),
    ]


def _v(version) -> str:
    return f"v{version}" if version is not None else "none"


def _forgetting(details: dict) -> str | None:
    cand = (details.get("candidate") or {}).get("forgetting") or {}
    base = (details.get("base") or {}).get("forgetting") or {}
    c, b = cand.get("score"), base.get("score")
    if c is None:
        return None
    return f"candidate {c:.4f}, base {b:.4f}, drop {b - c:+.4f} (n={len(cand.get('per_example') or [])})" if b is not None \
        else f"candidate {c:.4f}"


def _curate_summary(cur: dict) -> str | None:
    if not cur:
        return None
    cur_ = cur.get("curated") or {}
    skipped = cur.get("skipped") or {}
    return (f"{cur.get('requests_seen', 0)} requests seen, {cur_.get('total', 0)} curated (by feedback kind "
            f"{cur_.get('by_kind') or {}}; records {cur.get('records') or {}}), {skipped.get('total', 0)} skipped "
            f"(by reason {skipped.get('by_reason') or {}}); every record carries its request id, model, "
            "served version and feedback kind as provenance")


def to_markdown(f: Facts, secs: list[tuple[str, list[dict]]]) -> str:
    out = [f"# Technical documentation: {f.name} v{f.version}", "",
           f"Template: {TEMPLATE}. Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} by loraflow "
           "from the MLflow registry and the serving log.", ""]
    for title, blocks in secs:
        out += [f"## {title}", ""]
        for b in blocks:
            if "text" in b:
                out += [b["text"], ""]
            elif "kv" in b:
                out += [f"- **{k}**: {v}" for k, v in b["kv"]] + [""]
            elif "list" in b:
                out += [f"- {x}" for x in b["list"]] + [""]
            elif "table" in b:
                head, rows = b["table"]
                out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows] + [""]
    return "\n".join(out)


def to_html(f: Facts, secs: list[tuple[str, list[dict]]]) -> str:
    e = html.escape

    def inline(s: str) -> str:  # the one Markdown construct the blocks use: **bold**
        parts = e(s).split("**")
        return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))

    body = [f"<h1>Technical documentation: {e(f.name)} v{f.version}</h1>",
            f"<p class=meta>Template: {e(TEMPLATE)}. Generated {e(datetime.now(timezone.utc).isoformat(timespec='seconds'))} "
            "by loraflow from the MLflow registry and the serving log.</p>"]
    for title, blocks in secs:
        body.append(f"<h2>{e(title)}</h2>")
        for b in blocks:
            if "text" in b:
                body.append(f"<p>{inline(b['text'])}</p>")
            elif "kv" in b:
                body.append("<dl>" + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in b["kv"]) + "</dl>")
            elif "list" in b:
                body.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in b["list"]) + "</ul>")
            elif "table" in b:
                head, rows = b["table"]
                body.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
                            + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
                            + "</table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.2rem .5rem;"
             "text-align:left;vertical-align:top}dt{font-weight:600}dd{margin:0 0 .4rem 1rem}.meta{color:#555}")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{e(f.name)} v{f.version}: technical "
            f"documentation</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def write(cfg: RegistryConfig, name: str, version: int | None, out_dir: Path,
          serving_log: Path | None = None) -> tuple[Path, Path, Facts]:
    """Render the dossier to ``out_dir/<name>-v<version>.{md,html}``."""
    f = gather(cfg, name, version, serving_log)
    secs = sections(f)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, page = out_dir / f"{name}-v{f.version}.md", out_dir / f"{name}-v{f.version}.html"
    md.write_text(to_markdown(f, secs), encoding="utf-8")
    page.write_text(to_html(f, secs), encoding="utf-8")
    return md, page, f


def publish(cfg: RegistryConfig, name: str, version: int | None, out_dir: Path,
            serving_log: Path | None = None) -> tuple[Path, Path]:
    """Write the dossier and log both files to the version's run (``dossier/``), replacing the last ones."""
    md, page, f = write(cfg, name, version, out_dir, serving_log)
    c = registry.client(cfg)
    for path in (md, page):
        registry.call(cfg, f"log {path.name} to run {f.run_id}", lambda p=path: c.log_artifact(f.run_id, str(p), "dossier"))
    return md, page


def refresher(cfg: RegistryConfig, out_dir: Path, serving_log: Path | None, say: Callable[[str], None] = print,
              background: bool = True) -> Callable[[dict], None]:
    """The endpoint's ``on_change``: serving state changed, so regenerate and re-log the dossiers of the
    versions it touched (in a thread: documentation never holds up serving; a failure is a warning and
    ``loraflow dossier`` writes it again)."""

    def refresh(event: dict) -> None:
        for v in sorted({event.get("version"), event.get("previous")} - {None}):
            try:
                publish(cfg, event["model"], int(v), out_dir, serving_log)
            except Exception as e:  # noqa: BLE001 - see above
                say(f"warning: dossier of {event['model']} v{v} not regenerated: {type(e).__name__}: {e}")

    def on_change(event: dict) -> None:
        if background:
            threading.Thread(target=refresh, args=(event,), daemon=True, name="loraflow-dossier").start()
        else:
            refresh(event)

    return on_change
