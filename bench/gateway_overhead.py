"""The gateway's cost: throughput and latency through the endpoint vs straight to vLLM, and swap time.

    .venv/bin/python bench/gateway_overhead.py [--clients 8] [--requests 16] [--runs 5]
    # on a GPU host, with a given base and adapter and vLLM's CUDA build (docs/benchmarks.md):
    python3 bench/gateway_overhead.py --clients 8,32,128 --runs 3 --base DIR --adapter DIR --serve-python P --gpu

Builds a small builtin base (no pretraining: serving cost does not depend on the weights) and a LoRA
adapter, starts vLLM (CPU build, `.venv-vllm`) with an API key and the gateway in front of it, then for each
of ``--runs`` rounds sends the same workload (``--clients`` threads x ``--requests`` chat completions,
max_tokens 16, temperature 0) once directly to vLLM and once through the gateway, in alternating order.
Reports per round: requests/s of each, the ratio gateway/direct, p50 and p99 latency of each; then the
median ratio with its spread. Swap: a second version is registered and the alias moved; the time from the
move to the first answer from the new version through the gateway (the follower reconciles at once, as a
webhook makes it do). Prints JSON; docs/benchmarks.md has the table.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from pipeline.config import (BuiltinBaseConfig, LimitsConfig, RegistryConfig, SanitizeConfig, ServeConfig,  # noqa: E402
                             TaskConfig, TrainConfig)
from pipeline.data.sanitize import sanitize_files  # noqa: E402
from pipeline.hashing import dir_sha256  # noqa: E402
from pipeline.io import load_chat_file  # noqa: E402
from pipeline import registry  # noqa: E402
from pipeline.serve.follow import Follower  # noqa: E402
from pipeline.serve.gateway import GatewayServer, RequestLog, Route, Routes, build_app  # noqa: E402
from pipeline.serve.vllm import VLLMServer  # noqa: E402

from pipeline.base.builtin import build_builtin  # noqa: E402
from pipeline.train.trainer import train  # noqa: E402

KEY = "bench-client-key"
# The bench measures the gateway's overhead, not its per-key limits: one key sends everything.
UNLIMITED = LimitsConfig(requests_per_s=1e9, burst=10**9, max_concurrent=10**6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workload(url: str, key: str, model: str, prompts: list[list[dict]], clients: int, per_client: int) -> dict:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(timeout=300, headers={"Authorization": f"Bearer {key}"}) as c:
            for j in range(per_client):
                body = {"model": model, "messages": prompts[(i * per_client + j) % len(prompts)],
                        "max_tokens": 16, "temperature": 0}
                t0 = time.perf_counter()
                r = c.post(f"{url}/chat/completions", json=body)
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    errors[0] += r.status_code != 200

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    lat = sorted(latencies)
    return {"requests": len(lat), "errors": errors[0], "seconds": round(wall, 3), "req_per_s": round(len(lat) / wall, 3),
            "p50_ms": round(1000 * lat[len(lat) // 2], 1), "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1)}


def gateway_only(upstream: str, internal: str, port: int, log_path: str) -> None:
    import uvicorn

    routes = Routes()
    routes.set(Route("bench", internal, 1, TaskConfig(kind="text")))
    app = build_app(routes, upstream, "vllm-key", {KEY}, RequestLog(Path(log_path), 2**30, 30), limits=UNLIMITED)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def demo_setup(prefix: str) -> tuple[Path, Path]:
    """A temp folder with the demo data sanitized (``train/``, ``eval/``) and an untrained builtin base: serving
    speed does not depend on the weights."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    sanitize_files([ROOT / "data/raw/tickets_train.jsonl"], tmp / "train", SanitizeConfig())
    sanitize_files([ROOT / "data/raw/tickets_eval.jsonl"], tmp / "eval", SanitizeConfig())
    return tmp, build_builtin(BuiltinBaseConfig(pretrain_steps=0), [tmp / "train/clean.jsonl"], tmp / "base",
                              progress=lambda s: None)


def main() -> None:
    if sys.argv[1:2] == ["--gateway-only"]:
        return gateway_only(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="8", help="concurrent clients; several levels: 8,32,128")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--base", default="", help="a base model folder (default: an untrained builtin base)")
    ap.add_argument("--adapter", default="", help="with --base: its adapter (registered as v1 and v2)")
    ap.add_argument("--serve-python", default=str(ROOT / ".venv-vllm/bin/python"))
    ap.add_argument("--gpu", action="store_true", help="vLLM's CUDA build: bf16, no CPU KV-cache setting")
    args = ap.parse_args()
    if args.base:
        tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
        sanitize_files([ROOT / "data/raw/tickets_eval.jsonl"], tmp / "eval", SanitizeConfig())
        base, adapters = Path(args.base), [Path(args.adapter), Path(args.adapter)]
    else:
        tmp, base = demo_setup("gw-bench-")
        adapters = []
        for seed in (0, 1):
            out = tmp / f"adapter-{seed}"
            train(TrainConfig(out_dir=str(out), checkpoint_dir=str(tmp / "ck"), trl=dict(max_steps=8, per_device_train_batch_size=8, seed=seed, learning_rate=2e-2 * (seed + 1))), base, tmp / "train/clean.jsonl")
            adapters.append(out)
    reg = RegistryConfig(tracking_uri=f"sqlite:///{tmp}/mlflow.db", artifact_root=str(tmp / "art"))
    for a in adapters:
        run = registry.log_candidate(reg, run_name=a.name, params={}, adapter_dir=a, train_metrics={}, eval_metrics={},
                                     artifacts={}, tags={})
        registry.register(reg, "bench", run, {"adapter_sha256": dir_sha256(a)}, "card")
    registry.promote(reg, "bench", 1)
    prompts = [r["prompt"] for r in load_chat_file(tmp / "eval/clean.jsonl")]
    gpu = dict(dtype="bfloat16", env={}, max_model_len=4096, extra_args=["--gpu-memory-utilization", "0.35"])
    cfg = ServeConfig(port=free_port(), log_file=str(tmp / "vllm.log"), python=args.serve_python,
                      **(gpu if args.gpu else {}))
    server = VLLMServer.start(cfg, base, api_key="vllm-key")
    levels = [int(c) for c in str(args.clients).split(",")]
    out: dict = {"clients": levels, "requests_per_client": args.requests, "levels": {}}
    try:
        server.wait_ready()
        routes = Routes()
        follower = Follower(server, routes, reg, tmp / "served", ["bench"], TaskConfig(kind="text"), prompts[:3],
                            say=lambda s: print(s, file=sys.stderr))
        follower.reconcile()
        internal = routes.get("bench").internal
        # The gateway in a process of its own, as `loraflow serve` runs it: client threads here would
        # otherwise share its interpreter (and GIL) and bill their own cost to it.
        gw_port = free_port()
        gw_proc = subprocess.Popen([sys.executable, __file__, "--gateway-only", server.url, internal, str(gw_port),
                                    str(tmp / "requests.jsonl")])
        gw_url = f"http://127.0.0.1:{gw_port}/v1"
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{gw_port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        for clients in levels:
            workload(gw_url, KEY, "bench", prompts, clients, 2)  # warm-up of both paths
            workload(f"{server.url}/v1", "vllm-key", internal, prompts, clients, 2)
            rounds = []
            for r in range(args.runs):
                order = [("direct", f"{server.url}/v1", "vllm-key", internal), ("gateway", gw_url, KEY, "bench")]
                res = {}
                for name, url, key, model in (order if r % 2 == 0 else order[::-1]):
                    res[name] = workload(url, key, model, prompts, clients, args.requests)
                res["throughput_ratio"] = round(res["gateway"]["req_per_s"] / res["direct"]["req_per_s"], 3)
                res["added_p50_ms"] = round(res["gateway"]["p50_ms"] - res["direct"]["p50_ms"], 1)
                res["added_p99_ms"] = round(res["gateway"]["p99_ms"] - res["direct"]["p99_ms"], 1)
                rounds.append(res)
                print(json.dumps({"clients": clients, **res}), file=sys.stderr, flush=True)
            ratios = [x["throughput_ratio"] for x in rounds]
            out["levels"][clients] = {
                "rounds": rounds, "median_ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
                "median_added_p50_ms": statistics.median(x["added_p50_ms"] for x in rounds),
                "median_added_p99_ms": statistics.median(x["added_p99_ms"] for x in rounds)}
        gw_proc.terminate()
        gw_proc.wait(30)
        out["logged_requests"] = len((tmp / "requests.jsonl").read_text().splitlines())
        # Swap time, in-process (the follower and the route table must be shared to time them).
        log = RequestLog(tmp / "swap-requests.jsonl", 2**30, 30)
        gw = GatewayServer(build_app(routes, server.url, "vllm-key", {KEY}, log, limits=UNLIMITED), "127.0.0.1", free_port()).start()
        swaps = []
        for target in (2, 1, 2):
            t0 = time.perf_counter()
            registry.promote(reg, "bench", target)
            follower.reconcile()
            r = httpx.post(f"{gw.url}/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                           json={"model": "bench", "messages": prompts[0], "max_tokens": 4}, timeout=60)
            assert r.status_code == 200 and routes.get("bench").version == target
            swaps.append(round(time.perf_counter() - t0, 2))
        out["swap_seconds"] = swaps
        gw.stop()
    finally:
        server.stop()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
