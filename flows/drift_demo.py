"""The feedback loop, played end to end on embedded defaults:

    loraflow demo --drift

1. the demo (``flows/demo.py``): train, gate, promote, serve the champion;
2. traffic shifts to requests the training data lacks (``--drift-file``, by default
   data/drift/feature_requests.jsonl: the category ``feature_request``, which params.yaml's schema accepts
   and no training record has); a fixed test set of them is asked first, to score the champion;
3. a simulated user corrects a share of the wrong answers (``POST /v1/feedback`` with the answer's id)
   and gives a thumbs up to the right ones;
4. the Prefect flow ``drift-check`` judges the window; on drift the ``retrain`` flow runs as the drift
   trigger would start it: curate -> sanitize -> ... -> gate (with the curated slice) -> promotion;
5. the endpoint's follower swaps to the new champion, and the test set is asked again.

The summary prints the drifted test set's accuracy before and after (paired bootstrap interval), the gate's
slices, and the loop latency: from the first drifted request to the new champion answering.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from pipeline.config import Params, load_params
from pipeline.io import write_json
from pipeline.release.gate import paired_bootstrap
from pipeline.tasks import build_task

DRIFT_SUMMARY_FILE = Path("reports/drift-loop.json")


def _ask(client: httpx.Client, p: Params, rows: list[dict]) -> list[dict]:
    task = build_task(p.task)
    out = []
    for row in rows:
        r = client.post("/chat/completions", json={"model": p.project.name, "messages": row["messages"][:-1]})
        if r.status_code != 200:
            raise RuntimeError(f"the endpoint answered HTTP {r.status_code}: {r.text[:300]}")
        body = r.json()
        answer = body["choices"][0]["message"]["content"]
        expected = row["messages"][-1]["content"]
        out.append({"id": body["id"], "version": int(r.headers.get("x-loraflow-version", 0)), "answer": answer,
                    "expected": expected,
                    "correct": task.score(answer, expected).values[p.task.primary_metric]})
    return out


def run_drift_demo(params_file: str = "params.yaml", drift_file: str = "data/drift/feature_requests.jsonl",
                   traffic: int = 150, test: int = 60, feedback_share: float = 0.6, requests: int = 40,
                   progress: Callable[[str], None] = print) -> dict:
    from flows.demo import run_demo
    from flows.monitor import drift_check
    from flows.retrain import retrain

    rows = [json.loads(line) for line in Path(drift_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(rows) < traffic + test:
        raise ValueError(f"{drift_file}: {len(rows)} records; the scenario needs --traffic {traffic} + --test {test}")
    test_rows, traffic_rows = rows[:test], rows[test:test + traffic]
    report, endpoint = run_demo(params_file, requests=requests, keep_serving=True, progress=progress)
    p = load_params(params_file)
    key = next(iter(endpoint.keys))
    stop = threading.Event()
    threading.Thread(target=endpoint.follow, args=(stop,), daemon=True, name="loraflow-follow").start()
    timings: dict[str, float] = {}
    try:
        with httpx.Client(base_url=endpoint.url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
            first_drifted = time.perf_counter()
            progress(f"[drift] asking the champion {test} held-out drifted requests ({drift_file})")
            before = _ask(client, p, test_rows)
            progress(f"[drift] {traffic} drifted requests as traffic; a user corrects {feedback_share:.0%} of the "
                     "wrong answers and gives the right ones a thumbs up")
            answered = _ask(client, p, traffic_rows)
            wrong = [a for a in answered if not a["correct"]]
            corrected = wrong[:round(len(wrong) * feedback_share)]
            for a in answered:
                body = ({"id": a["id"], "thumbs": "down", "correction": a["expected"]} if a in corrected else
                        {"id": a["id"], "thumbs": "up"} if a["correct"] else None)
                if body is not None:
                    r = client.post("/feedback", json=body)
                    if r.status_code != 200:
                        raise RuntimeError(f"POST /v1/feedback answered HTTP {r.status_code}: {r.text[:300]}")
            endpoint.log.flush()
            timings["traffic_and_feedback_s"] = round(time.perf_counter() - first_drifted, 1)
            progress("[drift] running the Prefect flow `drift-check`")
            t = time.perf_counter()
            drift = drift_check(params_file=params_file)
            timings["drift_check_s"] = round(time.perf_counter() - t, 1)
            result: dict = {}
            after: list[dict] = []
            new_version = None
            if drift.get("drift"):
                progress("[drift] drift: running the Prefect flow `retrain` as the drift trigger does")
                t = time.perf_counter()
                result = retrain(params_file=params_file, trigger="drift", drift_summary=drift["summary"])
                timings["retrain_s"] = round(time.perf_counter() - t, 1)
                champion = result.get("champion") or {}
                new_version = champion.get("version")
                if result.get("promoted") and new_version:
                    t = time.perf_counter()
                    endpoint.wake.set()  # what the registry webhook does under `loraflow up`
                    deadline = time.monotonic() + 900
                    while (endpoint.routes.get(p.project.name) is None or
                           endpoint.routes.get(p.project.name).version != new_version):
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"v{new_version} was not served within 900 s")
                        time.sleep(0.5)
                    timings["serving_swap_s"] = round(time.perf_counter() - t, 1)
                    timings["loop_latency_s"] = round(time.perf_counter() - first_drifted, 1)
                    progress(f"[drift] v{new_version} serves; asking the {test} held-out drifted requests again")
                    after = _ask(client, p, test_rows)
            else:
                progress(f"[drift] no drift detected ({drift.get('status')}, share {drift.get('drift_share')}): "
                         "nothing retrains")
    finally:
        stop.set()
        endpoint.stop()
    summary = {"demo": {"champion": report["model"]["champion"], "gate": report["gate"]["promote"]},
               "drift_file": drift_file, "test": test, "traffic": traffic,
               "feedback": {"wrong": len(wrong), "corrected": len(corrected),
                            "thumbs_up": int(sum(a["correct"] for a in answered))},
               "drift": {k: drift.get(k) for k in ("status", "drift", "drift_share", "threshold", "requests", "drifted")},
               "retrain": {k: result.get(k) for k in ("outcome", "message", "registered_version", "promoted", "note")}
               if result else None,
               "gate": result.get("decision") if result else None,
               "curate": json.loads(Path("reports/curate.json").read_text()) if Path("reports/curate.json").is_file() else None,
               "before": {"version": before[0]["version"], "accuracy": sum(a["correct"] for a in before) / len(before)},
               "after": ({"version": after[0]["version"], "accuracy": sum(a["correct"] for a in after) / len(after)}
                         if after else None),
               "timings": timings}
    if after:
        iv = paired_bootstrap([a["correct"] for a in after], [b["correct"] for b in before], paired_on="exact_match")
        summary["difference"] = iv.to_dict()
        summary["answered_by_new_version"] = all(a["version"] == new_version for a in after)
    write_json(DRIFT_SUMMARY_FILE, summary)
    return summary


def format_drift_summary(s: dict) -> str:
    lines = ["", "loraflow drift loop: summary", "=" * 60,
             f"  drifted requests: {s['test']} held-out test + {s['traffic']} traffic from {s['drift_file']}",
             f"  feedback: {s['feedback']['corrected']} corrections of {s['feedback']['wrong']} wrong answers, "
             f"{s['feedback']['thumbs_up']} thumbs up"]
    d = s["drift"]
    lines.append(f"  drift-check: {'DRIFT' if d.get('drift') else 'no drift'} (share {d.get('drift_share')}, "
                 f"threshold {d.get('threshold')}, {d.get('requests')} requests; drifted: {d.get('drifted')})")
    c = s.get("curate")
    if c and "curated" in c:
        lines.append(f"  curate: {c['requests_seen']} requests seen = {c['curated']['total']} curated + "
                     f"{c['skipped']['total']} skipped {c['skipped']['by_reason']}; records {c['records']}")
    if s.get("retrain"):
        lines.append(f"  retrain: {s['retrain']['outcome']}: v{s['retrain']['registered_version']} "
                     f"{s['retrain']['note'] or s['retrain']['message'] or ''}")
    g = s.get("gate") or {}
    for reason in g.get("reasons", []):
        lines.append(f"    - {reason}")
    lines.append(f"  drifted test set, {s['test']} requests: v{s['before']['version']} accuracy "
                 f"{s['before']['accuracy']:.3f}" + (f" -> v{s['after']['version']} {s['after']['accuracy']:.3f}, "
                                                       f"difference {s['difference']['mean']:+.3f} "
                                                       f"[{s['difference']['low']:+.3f}, {s['difference']['high']:+.3f}]"
                                                       if s.get("after") else " (no new champion)"))
    if "loop_latency_s" in s["timings"]:
        lines.append(f"  loop latency (first drifted request -> new champion answering): "
                     f"{s['timings']['loop_latency_s']:.0f}s")
    lines.append(f"  time: {s['timings']}; summary: {DRIFT_SUMMARY_FILE}")
    return "\n".join(lines)
