"""Teacher labelling through the curate stage, with a local vLLM (CPU build) as the teacher.

    .venv/bin/python bench/teacher_throughput.py [--requests 60] [--rounds 3] [--concurrency 4]

One vLLM serves the builtin base (untrained: labelling speed does not depend on the weights, and a text
task accepts any answer). Each round curates the same logged, unlabelled requests twice with a fresh cache:
once with ``teacher.concurrency: 1`` (the baseline) and once with ``--concurrency``, alternating which goes
first; then the second configuration runs again on new requests with the same prompts (the re-run: every
label should come from the cache). Reports records/s of each, the ratio, median and spread over rounds, and
the re-run's cache hit rate and calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gateway_overhead import demo_setup, free_port  # noqa: E402
from pipeline.config import CurateConfig, ServeConfig, TaskConfig, TeacherConfig  # noqa: E402
from pipeline.curate import curate  # noqa: E402
from pipeline.curate.teacher import Teacher  # noqa: E402
from pipeline.io import load_chat_file  # noqa: E402
from pipeline.serve.vllm import VLLMServer  # noqa: E402
from pipeline.tasks import build_task  # noqa: E402


def write_log(folder: Path, prompts: list[list[dict]], tag: str) -> Path:
    t0 = datetime.now(timezone.utc)
    path = folder / "requests.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"ts": (t0 + timedelta(milliseconds=i)).isoformat(), "id": f"{tag}-{i}",
                                        "model": "m", "version": 1, "status": 200, "response": "",
                                        "prompt": p[-1]["content"], "messages": p}) + "\n"
                            for i, p in enumerate(prompts)))
    return path


def one_run(cfg: TeacherConfig, task: TaskConfig, prompts, folder: Path, tag: str) -> dict:
    teacher = Teacher(cfg, task, say=lambda m: None)
    try:
        started = time.perf_counter()
        report = curate(CurateConfig(eval_share=0.0), task, build_task(task), write_log(folder, prompts, tag),
                        folder / "feedback.jsonl", folder / "curated", teacher=teacher, say=lambda m: None)
        seconds = time.perf_counter() - started
    finally:
        teacher.close()
    assert report["reconciles"] and report["requests_seen"] == len(prompts), report
    return {"records_per_s": len(prompts) / seconds, "seconds": seconds, **report["teacher"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    tmp, base = demo_setup("teacher-bench-")
    prompts = [r["prompt"] for r in load_chat_file(tmp / "eval/clean.jsonl")][:args.requests]
    server = VLLMServer.start(ServeConfig(python=str(ROOT / ".venv-vllm/bin/python"), port=free_port(),
                                          log_file=str(tmp / "vllm.log")), base, api_key="bench-key")
    import os

    os.environ["BENCH_TEACHER_KEY"] = "bench-key"
    task = TaskConfig(kind="text", max_new_tokens=args.tokens)
    rounds = []
    try:
        server.wait_ready()
        for r in range(args.rounds):
            configs = {"baseline": 1, "concurrent": args.concurrency}
            order = list(configs) if r % 2 == 0 else list(reversed(configs))
            out = {}
            for name in order:
                cache = Path(tempfile.mkdtemp(prefix=f"cache-{name}-", dir=tmp))
                cfg = TeacherConfig(url=f"{server.url}/v1", model="base", api_key_env="BENCH_TEACHER_KEY",
                                    concurrency=configs[name], batch_size=16, requests_per_s=1000,
                                    max_per_run=10_000, cache_dir=str(cache))
                out[name] = one_run(cfg, task, prompts, tmp / f"r{r}-{name}", f"r{r}{name}")
                if name == "concurrent":
                    out["rerun"] = one_run(cfg, task, prompts, tmp / f"r{r}-rerun", f"r{r}rerun")
            out["ratio"] = out["concurrent"]["records_per_s"] / out["baseline"]["records_per_s"]
            rounds.append(out)
            print(f"round {r}: baseline {out['baseline']['records_per_s']:.2f} rec/s, concurrency "
                  f"{args.concurrency} {out['concurrent']['records_per_s']:.2f} rec/s (x{out['ratio']:.2f}); "
                  f"re-run {out['rerun']['records_per_s']:.1f} rec/s, cache hits {out['rerun']['cache_hits']}/"
                  f"{args.requests}, calls {out['rerun']['calls']}", flush=True)
    finally:
        server.stop()

    def med(key, sub="records_per_s"):
        vals = [r[key][sub] if sub else r[key] for r in rounds]
        return {"median": round(statistics.median(vals), 3), "min": round(min(vals), 3), "max": round(max(vals), 3)}

    result = {"machine": "x86_64 2 cores, vLLM CPU build", "date": datetime.now().date().isoformat(),
              "requests": args.requests, "max_tokens": args.tokens, "rounds": args.rounds,
              "baseline_concurrency_1": med("baseline"), f"concurrency_{args.concurrency}": med("concurrent"),
              "ratio": med("ratio", None), "rerun": med("rerun"),
              "rerun_cache_hit_rate": statistics.median(r["rerun"]["cache_hits"] / args.requests for r in rounds),
              "rerun_calls": [r["rerun"]["calls"] for r in rounds]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
