"""Serving under faults, load and abuse: `loraflow serve` (vLLM CPU) behind its gateway, a real MLflow
server, clients for several minutes while faults are injected on a schedule.

    .venv/bin/python bench/serving_faults.py --seconds 420 --clients 6     # prints a JSON summary

Schedule (seconds from the start of traffic): the alias moves to v2 (30); the MLflow store is locked by
another writer for 20 s (60); the MLflow server is stopped for 60 s (100-160); the alias moves to a broken
adapter, rank 32 > max_lora_rank (175); vLLM is killed (200) and `loraflow serve` must restart it. One
extra client floods with its own key from 60 s to 120 s.

Every request carries a marker in its prompt, so each client-side outcome is matched with the gateway's
log. Reported: sent / answered / refused by status / lost (no status at the client, or absent from the
log), answers from a version other than the one routed (the `X-Loraflow-Version` header against the log),
seconds dark (no request answered) outside the vLLM restart, in-flight counts at the end, the alias at the
end against the served version, and the other clients' latency while the flood ran.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
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
import psutil  # noqa: E402
import yaml  # noqa: E402

from pipeline import registry  # noqa: E402
from pipeline.base.builtin import build_builtin  # noqa: E402
from pipeline.config import BuiltinBaseConfig, RegistryConfig, SanitizeConfig, TrainConfig  # noqa: E402
from pipeline.data.sanitize import sanitize_files  # noqa: E402
from pipeline.hashing import dir_sha256  # noqa: E402
from pipeline.train.trainer import train  # noqa: E402

KEY, FLOOD_KEY = "bench-client", "bench-flooder"  # each steady client has its own key: KEY-<i>
VLLM_PYTHON = ROOT / ".venv-vllm/bin/python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {timeout_s}s")


class Mlflow:
    """A real `mlflow server` on SQLite that can be stopped and started again on the same store."""

    def __init__(self, tmp: Path) -> None:
        self.port, self.db, self.art, self.tmp = free_port(), tmp / "mlflow.db", tmp / "mlflow-art", tmp
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", f"sqlite:///{self.db}",
             "--default-artifact-root", str(self.art), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"], stdout=open(self.tmp / "mlflow.log", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True)
        wait_http(f"{self.uri}/health", 120)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:  # its workers can take longer: the outage starts now either way
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)


def build_fixtures(tmp: Path) -> tuple[Path, list[Path], list[list[dict]]]:
    raw = ROOT / "data/raw/tickets_train.jsonl"
    base = build_builtin(BuiltinBaseConfig(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=1,
                                           vocab_size=512, pretrain_steps=0, copy_circuit=False, output_scale=1.0,
                                           rope_theta=10000.0), [raw], tmp / "base")
    sanitize_files([raw], tmp / "clean", SanitizeConfig())
    clean = tmp / "clean/clean.jsonl"
    adapters = []
    for i, rank in enumerate((8, 8, 32)):  # the third does not fit serve.max_lora_rank: vLLM refuses it
        out = tmp / f"adapter-{i}"
        train(TrainConfig(out_dir=str(out), checkpoint_dir=str(tmp / f"ck{i}"), lora_r=rank, lora_alpha=2 * rank,
                          trl=dict(max_steps=4, per_device_train_batch_size=8, max_length=96, seed=i), max_truncated_share=1.0), base, clean)
        adapters.append(out)
    prompts = [json.loads(x)["messages"][:-1] for x in clean.read_text().splitlines()[:50]]
    return base, adapters, prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=420)
    ap.add_argument("--clients", type=int, default=6)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="serving-faults-"))
    base, adapters, prompts = build_fixtures(tmp)
    ml = Mlflow(tmp)
    ml.start()
    reg = RegistryConfig(tracking_uri=ml.uri, artifact_root=str(ml.art), retries=2, retry_backoff_s=0.5)
    for path in adapters:
        run = registry.log_candidate(reg, run_name=path.name, params={}, adapter_dir=path, train_metrics={},
                                     eval_metrics={}, artifacts={}, tags={})
        registry.register(reg, "svc", run, {"adapter_sha256": dir_sha256(path)}, "card")
    registry.promote(reg, "svc", 1)
    gw_port = free_port()
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump({
        "project": {"name": "svc"}, "task": {"name": "t", "kind": "text", "max_new_tokens": 8},
        "base": {"out_dir": str(base)}, "train": {"lora_r": 8},
        "registry": {"tracking_uri": reg.tracking_uri, "artifact_root": reg.artifact_root, "retries": 2},
        "serve": {"python": str(VLLM_PYTHON), "port": free_port(), "gateway_port": gw_port, "poll_interval_s": 3,
                  "log_file": str(tmp / "vllm.log"), "traffic_log": str(tmp / "requests.jsonl"),
                  "adapters_dir": str(tmp / "served"),
                  # Above what one steady client sends (~5/s), far below what the flood tries.
                  "limits": {"requests_per_s": 10, "burst": 20, "max_concurrent": 8}}}))
    serve_out = open(tmp / "serve.out", "w")
    serve = subprocess.Popen([str(Path(sys.executable).with_name("loraflow")), "serve", "--params", str(params)],
                             cwd=tmp, env={**os.environ, "LORAFLOW_API_KEYS": ",".join(
                                 [*(f"{KEY}-{i}" for i in range(args.clients)), FLOOD_KEY])},
                             stdout=serve_out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{gw_port}"
    results: list[dict] = []
    lock = threading.Lock()
    stop = threading.Event()
    events: list[tuple[float, str]] = []
    try:
        deadline = time.time() + 900
        while time.time() < deadline:  # vLLM start-up on CPU: minutes
            try:
                r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}-0"},
                               json={"model": "svc", "messages": prompts[0]}, timeout=60)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(3)
        t0 = time.time()
        counter = iter(range(10**9))

        def client(i: int, key: str, stream: bool, until: float, pause: float) -> None:
            with httpx.Client(timeout=180, headers={"Authorization": f"Bearer {key}"}) as c:
                while not stop.is_set() and time.time() < until:
                    n = next(counter)
                    marker = f"req-{n:07d}"
                    body = {"model": "svc", "stream": stream, "messages": [
                        {"role": "user", "content": f"{marker} {prompts[n % len(prompts)][-1]['content']}"}]}
                    sent = time.time()
                    rec = {"marker": marker, "key": key, "stream": stream, "sent": sent - t0}
                    try:
                        with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                            text = "".join(r.iter_text())
                            rec.update(status=r.status_code, version=r.headers.get("x-loraflow-version"),
                                       broken=stream and r.status_code == 200 and '"error"' in text)
                    except httpx.HTTPError as e:
                        rec.update(status=None, error=type(e).__name__)
                    rec["latency"] = time.time() - sent
                    with lock:
                        results.append(rec)
                    if pause:
                        time.sleep(pause)

        end = t0 + args.seconds
        threads = [threading.Thread(target=client, args=(i, f"{KEY}-{i}", i % 3 == 2, end, 0.2))
                   for i in range(args.clients)]
        # The flood: 12 threads on one key, no pause, from 60 s to 120 s (far above the key's 40/s).
        threads += [threading.Thread(target=lambda: (time.sleep(60), client(99, FLOOD_KEY, False, t0 + 120, 0)))
                    for _ in range(12)]
        for t in threads:
            t.start()

        def at(second: float, what: str, fn) -> None:
            time.sleep(max(0.0, t0 + second - time.time()))
            events.append((round(time.time() - t0, 1), what))
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - recorded: a fault step that failed is part of the result
                events.append((round(time.time() - t0, 1), f"{what} FAILED: {type(e).__name__}: {e}"))

        def lock_store() -> None:
            conn = sqlite3.connect(ml.db, timeout=5, isolation_level=None)
            conn.execute("BEGIN EXCLUSIVE")
            time.sleep(20)
            conn.close()

        def kill_vllm() -> None:
            [engine] = [c for c in psutil.Process(serve.pid).children(recursive=True)
                        if "vllm.entrypoints" in " ".join(c.cmdline())]
            engine.kill()

        at(30, "alias -> v2", lambda: registry.promote(reg, "svc", 2))
        at(60, "SQLite store locked for 20 s", lock_store)
        at(100, "MLflow server stopped", ml.stop)
        at(160, "MLflow server started", ml.start)
        at(175, "alias -> v3 (rank 32, broken)", lambda: registry.promote(reg, "svc", 3))
        at(200, "vLLM killed", kill_vllm)
        for t in threads:
            t.join()
        time.sleep(3)
        health = httpx.get(f"{url}/health", timeout=10).json()
        alias = registry.get_alias(reg, "svc").version
        served = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}-0"}, timeout=10).json()["data"]
    finally:
        stop.set()
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            serve.wait(120)
        ml.stop()
    log = [json.loads(x) for x in (tmp / "requests.jsonl").read_text().splitlines()]
    logged = {}
    for r in log:
        marker = r.get("prompt", "").split(" ", 1)[0]
        logged[marker] = r
    normal = [r for r in results if r["key"] != FLOOD_KEY]
    flood = [r for r in results if r["key"] == FLOOD_KEY]
    by_status: dict[str, int] = {}
    for r in results:
        by_status[str(r["status"])] = by_status.get(str(r["status"]), 0) + 1
    lost = [r["marker"] for r in results if r["status"] is None]
    refused_before_route = {401, 413, 429}  # answered by the gateway before a route: logged only from routing on
    unlogged = [r["marker"] for r in results if r["status"] not in refused_before_route and r["marker"] not in logged]
    wrong_version = [r["marker"] for r in results if r["status"] == 200 and r["marker"] in logged
                     and str(logged[r["marker"]]["version"]) != r["version"]]
    statuses_mismatch = [r["marker"] for r in results if r["marker"] in logged and r["status"] is not None
                         and not r["stream"] and logged[r["marker"]]["status"] != r["status"]]
    kill_at = next(t for t, what in events if what == "vLLM killed")
    ok_times = sorted(r["sent"] + r["latency"] for r in normal if r["status"] == 200 and not r.get("broken"))
    ok_times = [0.0, *ok_times, float(args.seconds)]  # dark at the start or the end counts too
    gaps = [(a, b) for a, b in zip(ok_times, ok_times[1:]) if b - a > 5]
    dark_outside_restart = sum(b - a for a, b in gaps if not (a <= kill_at + 1 and b >= kill_at))
    restart_gap = max((b - a for a, b in gaps if a <= kill_at + 1 <= b), default=0.0)

    def p50(rows):
        lat = [r["latency"] for r in rows if r["status"] == 200 and not r["stream"]]
        return round(statistics.median(lat) * 1000) if lat else None

    before_flood = [r for r in normal if 35 <= r["sent"] < 58]
    during_flood = [r for r in normal if 62 <= r["sent"] < 100]
    summary = {
        "seconds": args.seconds, "clients": args.clients, "events": events,
        "sent": len(results), "answered_200": by_status.get("200", 0), "by_status": by_status,
        "lost": len(lost), "not_in_log": len(unlogged), "log_status_differs": len(statuses_mismatch),
        "streams_broken_with_error_event": sum(1 for r in results if r.get("broken")),
        "answers_from_a_version_other_than_routed": len(wrong_version),
        "dark_s_outside_vllm_restart": round(dark_outside_restart, 1), "dark_s_vllm_restart": round(restart_gap, 1),
        "in_flight_at_end": health.get("in_flight"), "engine": health.get("engine"),
        "alias_at_end": alias, "served_at_end": [m["version"] for m in served],
        "flood": {"sent": len(flood), "429": sum(1 for r in flood if r["status"] == 429)},
        "others_p50_ms_before_flood": p50(before_flood), "others_p50_ms_during_flood": p50(during_flood),
        "work_dir": str(tmp),
    }
    print("RESULT " + json.dumps(summary))


if __name__ == "__main__":
    main()
