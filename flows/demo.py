"""The whole loop on embedded defaults: retrain -> serve the champion -> client traffic -> drift.

    loraflow demo        (what `make demo` runs)

vLLM starts as soon as the base model exists, so its start-up overlaps training; then the endpoint
`loraflow serve` runs (authenticated gateway, stable model name) loads the champion and the sample
traffic goes through it like any client's. The summary is printed and written to reports/last-run.json.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from pipeline import dvc_runner
from pipeline.config import load_params
from pipeline.config import Params
from pipeline.io import load_chat_file, read_json, write_json
from pipeline.serve.endpoint import Endpoint, start_vllm
from pipeline.serve.gateway import env_keys
from pipeline.layout import clean_split, serving_log
from pipeline.release.dossier import refresher
from pipeline.tasks import build_task

SUMMARY_FILE = Path("reports/last-run.json")


def send_sample_traffic(endpoint: Endpoint, key: str, n: int, p: Params) -> list[dict]:
    """Send ``n`` held-out prompts to the gateway as a client would: its key, the stable model name and no
    generation settings (the gateway fills in the task's). Every exchange lands, redacted, in the log."""
    rows = load_chat_file(clean_split(p, "eval"))[:n]
    answers = []
    with httpx.Client(base_url=endpoint.url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        for row in rows:
            r = client.post("/chat/completions", json={"model": p.project.name, "messages": row["prompt"]})
            if r.status_code != 200:
                raise RuntimeError(f"the endpoint answered HTTP {r.status_code}: {r.text[:300]}")
            answers.append({"prompt": row["prompt"][-1]["content"], "answer": r.json()["choices"][0]["message"]["content"],
                            "expected": row["completion"][0]["content"]})
    return answers


def run_demo(params_file: str = "params.yaml", requests: int = 40, keep_serving: bool = False,
             progress: Callable[[str], None] = print) -> tuple[dict, Endpoint]:
    """Returns the summary and the endpoint (still answering when ``keep_serving``; its client key is
    ``endpoint.keys``: ``LORAFLOW_API_KEYS`` when set, else a random key made for this run)."""
    from flows.monitor import drift_check
    from flows.retrain import retrain

    started = time.perf_counter()
    p = load_params(params_file)
    timings: dict[str, float] = {}
    prep = {}
    names = dvc_runner.stage_names()
    for stage in names[:names.index("base") + 1]:  # what vLLM needs: the base and the stages before it
        progress(f"[demo] dvc stage {stage} ...")
        r = dvc_runner.repro(stage)
        prep[stage] = {"ran": r.ran, "seconds": r.seconds}
    key = next(iter(env_keys()), "") or secrets.token_urlsafe(24)
    endpoint = Endpoint(p, start_vllm(p, progress), {key, *env_keys()}, say=progress,
                        on_change=refresher(p.registry, Path("reports/dossier"), serving_log(p), progress))
    try:
        t = time.perf_counter()
        progress("[demo] running the Prefect flow `retrain` (vLLM starts meanwhile)")
        summary = retrain(params_file=params_file)
        timings["retrain_flow_s"] = round(time.perf_counter() - t, 1)
        for stage, r in prep.items():  # the flow saw these as unchanged because the demo ran them first
            summary["stages"][stage] = r
        if not summary.get("champion"):
            # Nothing passed the gate yet: there is no model to serve, which is the gate doing its job.
            raise RuntimeError(f"{p.project.name} has no champion: v{summary.get('registered_version')} "
                               f"{summary.get('note', 'was not promoted')} (the gate's reasons are above; scores in "
                               f"{p.evaluate.out_dir}/metrics.json), so the demo has nothing to serve")
        progress("[demo] opening the endpoint: vLLM + gateway, serving each model's champion")
        endpoint.open()
        route = endpoint.routes.get(p.project.name)
        if route is None:
            raise RuntimeError(f"no champion of {p.project.name} could be served (see the lines above)")
        progress(f"[demo] sending {requests} requests for `{p.project.name}` to {endpoint.url}/chat/completions")
        t = time.perf_counter()
        answers = send_sample_traffic(endpoint, key, requests, p)
        endpoint.log.flush()
        timings["traffic_s"] = round(time.perf_counter() - t, 1)
        task = build_task(p.task)
        correct = sum(task.score(a["answer"], a["expected"]).values[p.task.primary_metric] for a in answers)
        progress("[demo] running the Prefect flow `drift-check`")
        t = time.perf_counter()
        drift = drift_check(params_file=params_file)
        timings["drift_flow_s"] = round(time.perf_counter() - t, 1)
    except BaseException:
        endpoint.stop()
        raise
    if not keep_serving:
        endpoint.stop()
    timings["total_s"] = round(time.perf_counter() - started, 1)
    report = {
        "stages": summary["stages"],
        "records": _record_counts(p),
        "metrics": {"base": summary["base"], "candidate": summary["candidate"]},
        "gate": summary["decision"],
        "model": {"name": summary["model_name"], "registered_version": summary["registered_version"],
                  "newly_registered": summary["newly_registered"], "champion": summary["champion"]},
        "serving": {"served": route.name, "version": route.version, "adapter": route.internal,
                    "url": f"http://{p.serve.gateway_host}:{p.serve.gateway_port}/v1",
                    "sample": answers[0] if answers else None,
                    "served_metric": p.task.primary_metric,
                    "served_score": round(correct / max(len(answers), 1), 4), "requests": len(answers)},
        "drift": {k: drift.get(k) for k in ("status", "drift", "drift_share", "threshold", "requests", "html")},
        "where": {"mlflow_ui": f"loraflow up, then http://127.0.0.1:{p.platform.mlflow_port}",
                  "model_card": "reports/README.md", "drift_report": drift.get("html"),
                  "dossier": summary.get("dossier"),
                  "sanitize_report": "reports/sanitize.json", "traffic_log": p.serve.traffic_log},
        "timings": timings,
    }
    write_json(SUMMARY_FILE, report)
    return report, endpoint


def _record_counts(p) -> dict:
    out = {}
    for split in ("train", "eval"):
        f = Path(p.sanitize.out_dir, split, "report.json")
        if f.is_file():
            r = read_json(f)
            out[split] = {k: r[k] if not isinstance(r[k], dict) else r[k]["total"]
                          for k in ("read", "kept", "quarantined", "duplicates", "redactions")}
    aug = Path(p.augment.out_dir, "report.json")
    if aug.is_file():
        a = read_json(aug)
        out["augment"] = {"real": a["real"], "synthetic": a["synthetic"]}
    return out


def format_summary(r: dict) -> str:
    lines = ["", "loraflow demo: summary", "=" * 60]
    for stage, s in r["stages"].items():
        lines.append(f"  stage {stage:<11} {'ran' if s['ran'] else 'unchanged (skipped)':<20} {s['seconds']:>6.1f}s")
    rec = r["records"]
    if "train" in rec:
        t = rec["train"]
        lines.append(f"  train records: read {t['read']} = kept {t['kept']} + quarantined {t['quarantined']} "
                     f"+ duplicates {t['duplicates']}; PII redactions {t['redactions']}")
    if "eval" in rec:
        e = rec["eval"]
        lines.append(f"  eval records:  read {e['read']} = kept {e['kept']} + quarantined {e['quarantined']} "
                     f"+ duplicates/contamination {e['duplicates']}")
    if "augment" in rec:
        lines.append(f"  augment: {rec['augment']['synthetic']} synthetic + {rec['augment']['real']} real")
    for m in ("base", "candidate"):
        v = r["metrics"][m]
        lines.append(f"  {m:<9} " + "  ".join(f"{k} {x:.3f}" for k, x in v.items() if k != "n"))
    g = r["gate"]
    lines.append(f"  gate: {'PROMOTE' if g['promote'] else 'keep champion'}")
    lines.extend(f"    - {reason}" for reason in g["reasons"])
    mdl = r["model"]
    champ = mdl["champion"]
    lines.append(f"  registry: {mdl['name']} v{mdl['registered_version']}"
                 f"{'' if mdl['newly_registered'] else ' (already registered)'}; "
                 f"@{champ['alias']} -> v{champ['version']}" if champ else "  registry: no champion")
    s = r["serving"]
    lines.append(f"  served: `{s['served']}` = v{s['version']} at {s['url']} ({s['requests']} requests, "
                 f"{s['served_metric']} {s['served_score']:.3f})")
    if s.get("sample"):
        lines.append(f"    prompt: {s['sample']['prompt'][:90]}")
        lines.append(f"    answer: {s['sample']['answer']}")
    d = r["drift"]
    if d.get("status") == "ok":
        lines.append(f"  drift: {'DRIFT' if d['drift'] else 'no drift'} (share {d['drift_share']:.2f}, "
                     f"threshold {d['threshold']:.2f}, {d['requests']} requests) -> {d['html']}")
    else:
        lines.append(f"  drift: {d.get('status')}")
    lines.append(f"  MLflow UI: {r['where']['mlflow_ui']}")
    lines.append(f"  model card: {r['where']['model_card']}; summary: {SUMMARY_FILE}")
    if r["where"].get("dossier"):
        lines.append(f"  compliance dossier: {r['where']['dossier']} (Markdown beside it; `loraflow dossier` rewrites it)")
    lines.append(f"  time: {r['timings']}")
    return "\n".join(lines)
