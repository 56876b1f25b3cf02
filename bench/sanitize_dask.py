"""Sanitize on Dask: 1 vs 2 workers against the local engine, and the shuffle volume per GB of input.

    .venv/bin/python bench/sanitize_dask.py --mb 40 --rounds 3 --out bench/results/sanitize_dask_<date>.json

Each round runs, on one generated chat-JSONL corpus (bench/sanitize_throughput.make_corpus: 1-2 KB
records, PII, exact duplicates) with the default settings (PII, exact and near dedup): the local engine,
then a local Dask cluster of 1 worker and of 2 workers (the cluster is started before the timed run; its
start-up is reported apart). Every run's clean, validation and quarantine files must be identical to the
local run's. The driver's own time (total minus the time it waited for shards) is the serial decision
pass (dedup, conflicts, writing); with the per-worker rate and the shuffle volume it gives the projection
for larger corpora that docs/benchmarks.md states.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _isolated import save, spread  # noqa: E402
from sanitize_throughput import _run_in_child, make_corpus  # noqa: E402

from pipeline.config import ClusterConfig, SanitizeConfig  # noqa: E402
from pipeline.data.engine import DaskEngine  # noqa: E402
from pipeline.data.sanitize import sanitize_files  # noqa: E402


def _digest(out: Path) -> str:
    h = hashlib.sha256()
    for name in ("clean.jsonl", "validation.jsonl", "quarantine.jsonl"):
        h.update((out / name).read_bytes())
    return h.hexdigest()


def _run(corpus: Path, out: Path, workers: int, shard_mb: float) -> dict:
    cfg = SanitizeConfig(max_chars=100_000, engine="dask" if workers else "local",
                         cluster=ClusterConfig(workers=max(workers, 1), shard_mb=shard_mb, memory_limit="3GiB"))
    if not workers:  # in a forked child: its peak RSS is the local run's own
        secs, rss, r = _run_in_child(lambda: sanitize_files([corpus], out, cfg, validation_fraction=0.1))
        return {"s": secs, "startup_s": 0.0, "report": r, "digest": _digest(out), "rss_mb": rss}
    t0 = time.perf_counter()
    with DaskEngine.open(cfg) as engine:
        startup = time.perf_counter() - t0
        t = time.perf_counter()
        r = sanitize_files([corpus], out, cfg, validation_fraction=0.1, engine=engine)
        secs = time.perf_counter() - t
    return {"s": secs, "startup_s": startup, "report": r, "digest": _digest(out), "rss_mb": _rss_mb()}


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shard-mb", type=float, default=4)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        n = make_corpus(corpus, args.mb)
        size_mb = corpus.stat().st_size / 1e6
        print(f"corpus: {size_mb:.1f} MB, {n:,} records", flush=True)
        for i in range(args.rounds):
            rnd = {}
            for workers in (0, 1, 2):
                res = _run(corpus, Path(tmp) / f"r{i}w{workers}", workers, args.shard_mb)
                eng = res["report"]["engine"]
                rnd[workers] = {"s": res["s"], "startup_s": res["startup_s"], "digest": res["digest"],
                                "shards": eng["shards"], "workers": eng["workers"],
                                "shuffle_bytes": eng.get("shuffle_bytes", 0), "waited_s": eng.get("waited_s", 0.0),
                                "worker_peak_rss_mb": eng.get("worker_peak_rss_mb"), "peak_rss_mb": res["rss_mb"],
                                "kept": res["report"]["kept"], "duplicates": res["report"]["duplicates"]}
                print(f"round {i} workers {workers or 'local'}: {res['s']:.1f} s "
                      f"({size_mb / res['s']:.2f} MB/s)", flush=True)
            assert rnd[0]["digest"] == rnd[1]["digest"] == rnd[2]["digest"], "outputs differ between engines"
            rows.append(rnd)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    two_vs_one = [r[1]["s"] / r[2]["s"] for r in rows]
    one_vs_local = [r[0]["s"] / r[1]["s"] for r in rows]
    two_vs_local = [r[0]["s"] / r[2]["s"] for r in rows]
    shuffle_per_gb = [r[2]["shuffle_bytes"] / (size_mb * 1e6) for r in rows]
    driver_s = [r[2]["s"] - r[2]["waited_s"] for r in rows]  # the serial decision pass
    worker_rate = [size_mb / (r[1]["s"]) for r in rows]  # 1 worker: MB/s one worker prepares (driver overlaps)
    summary = {
        "date": str(date.today()), "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "command": f"python bench/sanitize_dask.py --mb {args.mb:g} --rounds {args.rounds} --shard-mb {args.shard_mb:g}",
        "corpus_mb": round(size_mb, 1), "records": n, "shards": rows[0][2]["shards"],
        "local_mb_s": spread(size_mb / r[0]["s"] for r in rows),
        "dask1_mb_s": spread(worker_rate),
        "dask2_mb_s": spread(size_mb / r[2]["s"] for r in rows),
        "speedup_2_vs_1_workers": spread(two_vs_one),
        "dask1_vs_local": spread(one_vs_local), "dask2_vs_local": spread(two_vs_local),
        "shuffle_bytes_per_input_byte": spread(shuffle_per_gb),
        "driver_serial_mb_s": spread(size_mb / d for d in driver_s),
        "cluster_startup_s": spread(r[2]["startup_s"] for r in rows),
        # Peak RSS: the local run's process (first in each round, so its own), and the largest Dask worker.
        "local_peak_rss_mb": spread(r[0]["peak_rss_mb"] for r in rows),
        "worker_peak_rss_mb_2_workers": spread(r[2]["worker_peak_rss_mb"] for r in rows),
        "identical_outputs": True,
    }
    save(args.out, {"summary": summary, "rounds": rows, "median_of": med([1])})


if __name__ == "__main__":
    main()
