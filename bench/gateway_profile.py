"""Where the gateway's time goes per request, without vLLM's cost in the way (issue 26: the gateway reached
only 0.85-0.93x of direct vLLM on the H200).

    .venv/bin/python bench/gateway_profile.py [--requests 2000] [--clients 32] [--rounds 3] [--profile]

An instant upstream (an ASGI app answering every chat completion at once with a fixed answer, in its own
process) stands in for vLLM, so everything measured is the gateway's own: the real app (`build_app`, keys,
limits, routes, the request log with the sanitizer's redactor) in a process of its own, as `loraflow serve`
runs it. Reports the gateway process's CPU milliseconds per request (its user + system time over the run,
read with psutil) for the gateway's connection pools as they are (8 pools of 16 connections per replica) and
as they were (one httpx pool of 100), alternating in each round; with --profile, the top functions of a
cProfile of the current gateway instead. Prints JSON.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

ANSWER = {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": '{"category": "billing", "priority": "high"}'},
                       "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52}}


def upstream(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request):
        await request.body()
        return JSONResponse(ANSWER)

    async def models(request):
        return JSONResponse({"data": [{"id": "m"}]})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def gateway(up_url: str, port: int, log_path: str, prof_path: str, shards: str) -> None:
    import signal

    import uvicorn

    from pipeline.serve.gateway import upstreams as pools

    if shards == "one-pool":  # the former client: one httpx pool with its default 100 connections
        pools.POOL_SHARDS, pools.POOL_CONNECTIONS = 1, 100
    elif "x" in shards:  # SxC: S pools of C connections each
        pools.POOL_SHARDS, pools.POOL_CONNECTIONS = map(int, shards.split("x"))

    from gateway_overhead import KEY, UNLIMITED
    from pipeline.config import TaskConfig
    from pipeline.serve.gateway import RequestLog, Route, Routes, build_app

    routes = Routes()
    routes.set(Route("bench", "m", 1, TaskConfig(kind="text")))
    app = build_app(routes, up_url, "k", {KEY}, RequestLog(Path(log_path), 2**30, 30), limits=UNLIMITED)
    prof = cProfile.Profile()

    def stop(*_):
        if prof_path:
            prof.disable()
            prof.dump_stats(prof_path)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    if prof_path:
        prof.enable()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def main() -> None:
    if sys.argv[1:2] == ["--upstream"]:
        return upstream(int(sys.argv[2]))
    if sys.argv[1:2] == ["--gateway"]:
        return gateway(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--compare", default="one-pool,sharded",
                    help="two pool layouts, paired: one-pool, sharded (as the gateway is), or SxC (S pools of C)")
    args = ap.parse_args()
    a, b = args.compare.split(",")
    import statistics

    from pipeline.io import load_chat_file

    tmp = Path(tempfile.mkdtemp(prefix="gw-prof-"))
    prompts = [r["prompt"] for r in load_chat_file(ROOT / "data/raw/tickets_eval.jsonl")]
    if args.profile:
        print(json.dumps(measure(tmp, prompts, args, "sharded", tmp / "gateway.prof"), indent=1))
        return
    rounds = []
    for r in range(args.rounds):
        row = {}
        for pools in ((a, b) if r % 2 == 0 else (b, a)):
            row[pools] = measure(tmp, prompts, args, pools, None)
        # Ratios: the second layout against the first.
        row["cpu_ratio"] = round(row[b]["gateway_cpu_ms_per_request"] / row[a]["gateway_cpu_ms_per_request"], 3)
        row["throughput_ratio"] = round(row[b]["req_per_s"] / row[a]["req_per_s"], 3)
        rounds.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    out = {"clients": args.clients, "compare": [a, b], "rounds": rounds}
    for k in ("cpu_ratio", "throughput_ratio"):
        vals = [x[k] for x in rounds]
        out[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    print(json.dumps(out, indent=1))


def measure(tmp: Path, prompts, args, pools: str, prof_path: Path | None) -> dict:
    import httpx
    import psutil

    from gateway_overhead import KEY, free_port, workload

    up_port, gw_port = free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--upstream", str(up_port)])]
    procs.append(subprocess.Popen([sys.executable, __file__, "--gateway", f"http://127.0.0.1:{up_port}", str(gw_port),
                                   str(tmp / f"requests-{gw_port}.jsonl"), str(prof_path or ""), pools]))
    try:
        for url in (f"http://127.0.0.1:{up_port}/v1/models", f"http://127.0.0.1:{gw_port}/health"):
            for _ in range(300):
                try:
                    httpx.get(url, timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
        gw = psutil.Process(procs[1].pid)
        workload(f"http://127.0.0.1:{gw_port}/v1", KEY, "bench", prompts, args.clients, 4)  # warm-up: every pool opened
        cpu0 = sum(gw.cpu_times()[:2])
        res = workload(f"http://127.0.0.1:{gw_port}/v1", KEY, "bench", prompts, args.clients,
                       max(1, args.requests // args.clients))
        time.sleep(1.0)  # the log's writer thread finishes the queued records (its cost is the gateway's too)
        cpu = sum(gw.cpu_times()[:2]) - cpu0
        procs[1].terminate()
        procs[1].wait(30)
        out = {"requests": res["requests"], "errors": res["errors"], "req_per_s": res["req_per_s"],
               "p50_ms": res["p50_ms"], "gateway_cpu_ms_per_request": round(1000 * cpu / res["requests"], 3)}
        if prof_path:
            stats = pstats.Stats(str(prof_path))
            top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:15]  # by own time
            out["top_own_time"] = [{"function": f"{Path(f).name}:{line} {name}", "calls": n, "own_s": round(tt, 3),
                                    "cumulative_s": round(ct, 3)} for (f, line, name), (_, n, tt, ct, _) in top]
        return out
    finally:
        for p in procs:
            p.terminate()


if __name__ == "__main__":
    main()
