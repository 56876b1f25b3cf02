"""The platform's own clock: `loraflow up` to all-healthy (cold, no-op, restart), and the loop latency from a
drift event to the new champion answering through the gateway, at demo scale (params.yaml as shipped: the
900-step builtin base is rebuilt from the new data, vLLM restarts on it).

    .venv/bin/python bench/platform_loop.py --runs 3 --out bench/results/platform_loop.json

Each loop: a new training file (`dvc add`, listed in params.yaml, committed), 25 drifted requests through
the gateway, then `prefect deployment run drift-check/production`; the clock stops when the gateway serves
the version the triggered retrain promoted. Canaries are off (probes.canaries: 0) so that the gate's leak
probe, which issue 24 is about, cannot hold a version back and leave nothing to time; the cooldown is 0 so
consecutive loops all retrain. Nothing else may run meanwhile (2 cores).
"""

from __future__ import annotations

import argparse
import json
import platform as host
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_platform import (BIN, Platform, copy_project, sh, _free_port, VLLM_PYTHON)  # noqa: E402


def project(tmp: Path) -> Platform:
    root = copy_project(tmp / "project")
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["probes"]["canaries"] = 0
    p["serve"].update({"python": str(VLLM_PYTHON), "port": _free_port(), "gateway_port": _free_port()})
    p["platform"].update({"prefect_port": _free_port(), "mlflow_port": _free_port(), "drift_cooldown_minutes": 0})
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    sh(["git", "commit", "-qam", "bench settings"], root)
    return Platform(root)


def timed_up(plat: Platform) -> float:
    t = time.time()
    plat.loraflow("up", timeout=900)
    return round(time.time() - t, 1)


def add_data(plat: Platform, seed: int) -> None:
    from pipeline.data.demo import generate

    name = f"data/raw/tickets_more_{seed}.jsonl"
    train, _ = generate(n_train=150, n_eval=0, seed=seed)
    (plat.root / name).write_text("\n".join(train) + "\n")
    sh([str(BIN / "dvc"), "add", name], plat.root)
    p = yaml.safe_load((plat.root / "params.yaml").read_text())
    p["data"]["train"].append(name)
    (plat.root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    sh(["git", "add", "-A"], plat.root)
    sh(["git", "commit", "-qm", f"data {seed}"], plat.root)


def loop_once(plat: Platform, i: int) -> dict:
    add_data(plat, 3000 + i)
    before = plat.champion()
    known = {r["id"] for r in plat.retrain_runs()}
    plat.drifted_traffic(25, f"bench{i}")
    time.sleep(1)
    t0 = time.time()
    check = plat.wait_run(plat.deployment_run("drift-check/production"), 300)
    t_event = time.time()
    run = plat.wait_run(plat.wait_new_retrain(known)["id"], 1800)
    t_registered = time.time()
    new = plat.champion()
    if run["state"]["name"] != "Completed" or new == before:
        return {"loop": i, "promoted": False, "state": run["state"]["name"], "message": run["state"].get("message")}
    plat.wait_served(new, 900)
    t1 = time.time()
    return {"loop": i, "promoted": True, "version": new, "drift_check_s": round(t_event - t0, 1),
            "retrain_s": round(t_registered - t_event, 1), "serving_swap_s": round(t1 - t_registered, 1),
            "total_s": round(t1 - t0, 1), "drift_check_state": check["state"]["name"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="bench/results/platform_loop.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plat = project(Path(tmp))
        res: dict = {"machine": f"{host.machine()} {host.processor() or ''} 2 cores".strip(),
                     "date": time.strftime("%Y-%m-%d")}
        try:
            res["up_cold_s"] = timed_up(plat)
            res["up_noop_s"] = timed_up(plat)
            t = time.time()
            first = plat.wait_run(plat.deployment_run("retrain/production"), 1800)
            res["first_retrain_s"] = round(time.time() - t, 1)
            assert first["state"]["type"] == "COMPLETED", first["state"]
            plat.wait_served(plat.champion(), 900)
            res["loops"] = [loop_once(plat, i) for i in range(args.runs)]
            print(json.dumps(res["loops"], indent=1), flush=True)
            t = time.time()
            plat.loraflow("down")
            res["down_s"] = round(time.time() - t, 1)
            res["up_restart_s"] = timed_up(plat)  # servers and worker back; the endpoint answers /health
            t = time.time()
            plat.wait_served(plat.champion(), 900)
            res["restart_to_champion_served_s"] = round(time.time() - t + res["up_restart_s"], 1)
        finally:
            plat.loraflow("down", check=False)
    totals = [r["total_s"] for r in res["loops"] if r.get("promoted")]
    if totals:
        res["loop_latency_median_s"] = statistics.median(totals)
        res["loop_latency_range_s"] = [min(totals), max(totals)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
