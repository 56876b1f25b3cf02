"""Benchmark: the `retrain` flow cold (empty DVC cache, empty registry) vs warm (unchanged inputs).

    .venv/bin/python bench/flow_timing.py [--runs 1]

Runs in a throw-away copy of the project (tracked files only, as a fresh clone), with ephemeral Prefect,
and prints one markdown row per run for docs/benchmarks.md: per-stage seconds, flow seconds and the
warm/cold ratio (the cost of a re-run that DVC can skip).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    from tests.conftest import copy_project

    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            project = copy_project(Path(tmp) / "project")
            os.chdir(project)
            os.environ["PREFECT_HOME"] = str(project / ".prefect")
            os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            from flows.retrain import retrain

            timings = []
            for label in ("cold", "warm"):
                t = time.perf_counter()
                summary = retrain(params_file="params.yaml")
                timings.append((label, time.perf_counter() - t, summary))
            (_, cold_s, cold), (_, warm_s, warm) = timings
            stages = " ".join(f"{k} {v['seconds']:.0f}s" for k, v in cold["stages"].items())
            print(f"| {date.today()} | {platform.node() or 'host'} ({os.cpu_count()} cores) | "
                  f"`python bench/flow_timing.py` | cold {cold_s:.0f}s ({stages}) | warm {warm_s:.0f}s "
                  f"(ran: {[k for k, v in warm['stages'].items() if v['ran']] or 'none'}) | "
                  f"{warm_s / cold_s:.2f} | EM base {cold['base']['exact_match']:.3f} -> "
                  f"candidate {cold['candidate']['exact_match']:.3f} |")


if __name__ == "__main__":
    main()
