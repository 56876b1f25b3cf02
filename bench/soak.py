"""A soak of the whole local platform (`loraflow up`) under a random schedule, with the loop's seams checked
continuously and reported as counts (issue 37).

    .venv/bin/python bench/soak.py --minutes 30 --seed 1 --out bench/results/soak.json

A fresh copy of the project (the tiny builtin base, canaries off, drift cooldown 0) is brought up, the first
retrain is run, then until the time is up one action at a time is drawn at random: traffic from three keys'
worth of clients (in-distribution or drifted), feedback of every kind on served answers (thumbs, scores,
comments, corrections, blank bodies), a new training data file (the builtin base is rebuilt), an alias move
through MLflow's REST API as its UI makes it, a drift check and a retrain started close together, vLLM
killed, the MLflow server paused (SIGSTOP) for 20-40 s. Counted at the end (targets all 0):

- ``wrong_base_answers``: answers whose version was trained on another base than the one vLLM ran when the
  answer was given (the vLLM process's --model folder, a base store folder named by its digest);
- ``drift_windows_without_one_trigger``: judged drifted windows (MLflow drift-check runs) with no
  ``loraflow.drift.detected`` event, or whose events started more than one retrain;
- ``untrainable_curated``: curated records that sanitize's record checks or the task refuse;
- ``history_missing`` / ``history_wrong_actor``: our UI moves absent from the alias history or not
  attributed to a person, and loraflow's own moves attributed to a person;
- ``requests_lost``: requests with no status at the client, or answered without their id in the log;
- ``champion_unserved_episodes``: the champion's base exists and it is not rejected, yet another version (or
  none) is served for longer than ``--grace`` seconds.
Nothing else may run meanwhile (2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform as host
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.platform_loop import add_data  # noqa: E402
from tests.test_platform import BIN, Platform, _free_port, copy_project, sh, VLLM_PYTHON  # noqa: E402

IN_DIST = ["My invoice was charged twice, please refund", "The app crashes when I log in",
           "Where is my parcel? It is two weeks late", "Please add dark mode to the dashboard"]


def project(tmp: Path) -> Platform:
    root = copy_project(tmp / "project")
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["base"]["builtin"]["pretrain_steps"] = 100
    p["probes"]["canaries"] = 0
    p["serve"].update({"python": str(VLLM_PYTHON), "port": _free_port(), "gateway_port": _free_port(),
                       "poll_interval_s": 30})
    p["monitor"].update({"min_requests": 20})
    p["curate"].update({"min_new_records": 5})
    p["platform"].update({"prefect_port": _free_port(), "mlflow_port": _free_port(), "drift_cooldown_minutes": 0})
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    sh(["git", "commit", "-qam", "soak settings"], root)
    return Platform(root)


class Soak:
    def __init__(self, plat: Platform, rng: random.Random, grace_s: float):
        self.plat, self.rng, self.grace_s = plat, rng, grace_s
        self.counts = {k: 0 for k in ("requests", "answered", "refused", "requests_lost", "wrong_base_answers",
                                      "feedback_sent", "feedback_stored", "feedback_refused", "ui_moves",
                                      "vllm_kills", "mlflow_pauses", "data_files", "drift_checks", "retrains",
                                      "champion_unserved_episodes")}
        self.answered_ids: list[str] = []
        self.ui_moves: list[tuple[int | None, int]] = []
        self.runs: list[str] = []
        self.log: list[str] = []
        self.stop = threading.Event()

    def say(self, msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        self.log.append(line)
        print(line, flush=True)

    # --- what vLLM runs, and what a version needs ---------------------------------------------------
    def vllm_base(self) -> str | None:
        port = str(self.plat.p["serve"]["port"])
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            if "vllm.entrypoints.openai.api_server" in cmd and port in cmd:
                return Path(cmd[cmd.index("--model") + 1]).name
        return None

    def version_tags(self, version: int) -> dict:
        r = httpx.get(f"{self.plat.mlflow}/api/2.0/mlflow/model-versions/get", timeout=30,
                      params={"name": self.plat.model, "version": str(version)})
        r.raise_for_status()
        return {t["key"]: t["value"] for t in r.json()["model_version"].get("tags", [])}

    # --- actions ------------------------------------------------------------------------------------
    def traffic(self, drifted: bool) -> None:
        for i in range(self.rng.randint(10, 25)):
            text = (f"Request {self.rng.random():.6f}: please draft a detailed multi-paragraph migration plan "
                    "for moving our entire analytics warehouse, dashboards and access policies " * 2) if drifted \
                else f"{self.rng.choice(IN_DIST)} (#{self.rng.randint(0, 10**6)})"
            self.counts["requests"] += 1
            before = self.vllm_base()
            try:
                r = self.plat.chat(text)
            except httpx.HTTPError as e:
                self.counts["requests_lost"] += 1
                self.say(f"request lost: {type(e).__name__}: {e}")
                continue
            if r.status_code != 200:
                self.counts["refused"] += 1
                continue
            self.counts["answered"] += 1
            rid, version = r.json()["id"], int(r.headers["X-Loraflow-Version"])
            self.answered_ids.append(rid)
            running = self.vllm_base()
            if running != before:
                continue  # vLLM restarted during the request: which base answered cannot be told
            try:
                want = self.version_tags(version).get("base_weights_sha256")
            except httpx.HTTPError:
                continue  # MLflow paused: not judged
            if want and running and want != running:
                self.counts["wrong_base_answers"] += 1
                self.say(f"WRONG BASE: v{version} needs {want[:12]}, vLLM runs {running[:12]}")

    def feedback(self) -> None:
        for rid in self.rng.sample(self.answered_ids[-60:], min(len(self.answered_ids[-60:]), self.rng.randint(3, 10))):
            body = self.rng.choice([
                {"thumbs": "up"}, {"thumbs": "down"}, {"score": self.rng.choice([1, 3, 5])}, {"comment": "meh"},
                {"correction": json.dumps({"category": "technical", "priority": "low"})},
                {"thumbs": "down", "correction": json.dumps({"category": "billing", "priority": "high"})},
                {}, {"correction": "  "}])
            self.counts["feedback_sent"] += 1
            try:
                r = self.plat.feedback({"id": rid, **body})
            except httpx.HTTPError:
                self.counts["feedback_refused"] += 1
                continue
            self.counts["feedback_stored" if r.status_code == 200 else "feedback_refused"] += 1

    def ui_move(self) -> None:
        try:
            champion = self.plat.champion()
            latest = int(httpx.get(f"{self.plat.mlflow}/api/2.0/mlflow/registered-models/get", timeout=30,
                                   params={"name": self.plat.model}).json()["registered_model"]
                         ["latest_versions"][-1]["version"])
        except (httpx.HTTPError, KeyError, IndexError):
            return
        target = self.rng.randint(1, latest)
        if target == champion:
            return
        r = httpx.post(f"{self.plat.mlflow}/ajax-api/2.0/mlflow/registered-models/alias", timeout=30,
                       json={"name": self.plat.model, "alias": "champion", "version": str(target)})
        if r.status_code == 200:
            self.ui_moves.append((champion, target))
            self.counts["ui_moves"] += 1
            self.say(f"UI move v{champion} -> v{target}")

    def new_data(self) -> None:
        add_data(self.plat, 5000 + self.counts["data_files"])
        self.counts["data_files"] += 1
        self.say("new training data file (the builtin base is rebuilt by the next retrain)")

    def drift_and_retrain(self) -> None:
        self.traffic(drifted=True)
        self.runs.append(self.plat.deployment_run("drift-check/production"))
        self.counts["drift_checks"] += 1
        if self.rng.random() < 0.5:
            self.runs.append(self.plat.deployment_run("retrain/production"))
            self.counts["retrains"] += 1
        self.say("drift check (and maybe a retrain) started")

    def kill_vllm(self) -> None:
        port = str(self.plat.p["serve"]["port"])
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            if "vllm.entrypoints.openai.api_server" in cmd and port in cmd:
                proc.kill()
                self.counts["vllm_kills"] += 1
                self.say("vLLM killed")
                return

    def pause_mlflow(self) -> None:
        rec = json.loads((self.plat.root / ".loraflow/run/mlflow.json").read_text())
        procs = [psutil.Process(rec["pid"]), *psutil.Process(rec["pid"]).children(recursive=True)]
        seconds = self.rng.randint(20, 40)
        try:
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(signal.SIGSTOP)
            self.say(f"MLflow paused for {seconds}s")
            time.sleep(seconds)
        finally:
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(signal.SIGCONT)
        self.counts["mlflow_pauses"] += 1

    # --- the continuous check: a champion left unserved ---------------------------------------------
    def watch_serving(self) -> None:
        since = None
        while not self.stop.wait(5):
            try:
                champion, served = self.plat.champion(), self.plat.served()
                tags = self.version_tags(champion) if champion else {}
            except Exception:  # noqa: BLE001 - MLflow paused, the gateway restarting: the episode goes on
                continue
            base = tags.get("base_weights_sha256", "")
            servable = champion and not tags.get("serving_status", "").startswith("rejected") and \
                (self.plat.root / "artifacts/bases" / base).is_dir()
            if not servable or served == champion:
                since = None
                continue
            since = since or time.time()
            if time.time() - since > self.grace_s:
                self.counts["champion_unserved_episodes"] += 1
                self.say(f"UNSERVED: champion v{champion} (base {base[:12]} present), served v{served}, "
                         f"for {time.time() - since:.0f}s")
                since = None

    def run(self, minutes: float) -> None:
        actions = [(self.traffic, 4), (self.feedback, 3), (self.ui_move, 1), (self.new_data, 1),
                   (self.drift_and_retrain, 2), (self.kill_vllm, 1), (self.pause_mlflow, 1)]
        weights = [w for _, w in actions]
        watcher = threading.Thread(target=self.watch_serving, daemon=True)
        watcher.start()
        deadline = time.time() + minutes * 60
        while time.time() < deadline:
            action = self.rng.choices([a for a, _ in actions], weights)[0]
            try:
                action(drifted=self.rng.random() < 0.5) if action == self.traffic else action()
            except Exception as e:  # noqa: BLE001 - a harness step failing is reported, the soak goes on
                self.say(f"{action.__name__} failed: {type(e).__name__}: {e}")
            time.sleep(self.rng.uniform(5, 30))
        self.stop.set()
        watcher.join()

    # --- the counts at the end ----------------------------------------------------------------------
    def settle(self) -> dict:
        time.sleep(30)  # a drift event's retrain is created by the server's trigger, a moment after the event
        for run in self.runs + [r["id"] for r in self.plat.retrain_runs("drift")]:
            try:
                self.plat.wait_run(run, 1800)
            except AssertionError as e:
                self.say(str(e)[:300])
        time.sleep(20)
        return {**self.counts, **self.check_log(), **self.check_history(), **self.check_triggers(),
                **self.check_curated()}

    def check_log(self) -> dict:
        logged = set()
        for f in sorted((self.plat.root / "data/serving").glob("requests*.jsonl")):
            for line in f.read_text().splitlines():
                try:
                    logged.add(json.loads(line).get("id"))
                except json.JSONDecodeError:
                    pass
        missing = [r for r in self.answered_ids if r not in logged]
        return {"requests_lost": self.counts["requests_lost"] + len(missing), "answered_missing_from_log": len(missing)}

    def check_history(self) -> dict:
        """Our UI moves, in order, against the history's moves attributed to a person (compared by where
        they took the alias: a reconcile notes where the alias was last settled as ``from``)."""
        from pipeline import registry
        from pipeline.config import RegistryConfig

        cfg = RegistryConfig(tracking_uri=self.plat.mlflow)
        moves = registry.history(cfg, self.plat.model)
        outside = [m["to"] for m in moves if m["by"] == registry.OUTSIDE]
        ours = [to for _, to in self.ui_moves]
        missing, i = 0, 0
        for to in ours:  # each of ours in the outside entries, in order (two quick moves may be noted as one)
            j = next((k for k in range(i, len(outside)) if outside[k] == to), None)
            if j is None:
                missing += 1
            else:
                i = j + 1
        wrong = sum(1 for to in outside if to not in ours)
        return {"history_entries": len(moves), "history_outside": len(outside), "history_missing": missing,
                "history_wrong_actor": wrong}

    def check_triggers(self) -> dict:
        """Each judged drifted window (an MLflow drift-check run tagged drift=true) against the events sent
        for it (by window id) and the drift-triggered retrains whose drift summary names its start."""
        api = f"{self.plat.mlflow}/api/2.0/mlflow"
        exps = httpx.get(f"{api}/experiments/search", params={"max_results": 100}, timeout=30)
        exps.raise_for_status()
        runs = httpx.post(f"{api}/runs/search", timeout=30, json={
            "experiment_ids": [e["experiment_id"] for e in exps.json().get("experiments", [])],
            "filter": "tags.`loraflow.kind` = 'drift-check' and tags.drift = 'true'", "max_results": 1000})
        runs.raise_for_status()
        starts = sorted({t["value"] for r in runs.json().get("runs", []) for t in r["data"].get("tags", [])
                         if t["key"] == "window_start"})
        events: list[dict] = []
        page = httpx.post(f"{self.plat.prefect}/events/filter", timeout=30, json={
            "filter": {"event": {"name": ["loraflow.drift.detected"]}, "occurred": {"since": "2020-01-01T00:00:00Z"}},
            "limit": 50})
        page.raise_for_status()
        body = page.json()
        events += body.get("events", [])
        while body.get("next_page"):
            body = httpx.get(body["next_page"], timeout=30).json()
            events += body.get("events", [])
        retrains = self.plat.retrain_runs("drift")
        without_one = 0
        for start in starts:
            sent = [e for e in events if e["payload"].get("window", {}).get("start") == start]
            started = [r for r in retrains if start in str(r["parameters"].get("drift_summary", ""))]
            if not sent or len(started) != 1:
                without_one += 1
                self.say(f"window {start}: {len(sent)} event(s), {len(started)} retrain(s)")
        return {"drifted_windows": len(starts), "drift_events": len(events), "drift_retrains": len(retrains),
                "drift_windows_without_one_trigger": without_one}

    def check_curated(self) -> dict:
        from pipeline.config import load_params
        from pipeline.stages import curated_record_check
        from pipeline.tasks import build_task

        p = load_params(self.plat.root / "params.yaml")
        check = curated_record_check(p, build_task(p.task))
        bad = total = 0
        for name in ("train.jsonl", "eval.jsonl"):
            f = self.plat.root / p.curate.out_dir / name
            for line in f.read_text().splitlines() if f.is_file() else []:
                total += 1
                bad += check(json.loads(line)["messages"]) is not None
        return {"curated_records": total, "untrainable_curated": bad}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--grace", type=float, default=420, help="seconds a swap or vLLM restart may take")
    ap.add_argument("--out", default="bench/results/soak.json")
    args = ap.parse_args()
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        plat = project(Path(tmp))
        soak = Soak(plat, random.Random(args.seed), args.grace)
        started = time.time()
        res: dict = {"machine": f"{host.machine()} 2 cores, CPU only (vLLM CPU build)", "date": time.strftime("%Y-%m-%d"),
                     "command": f"bench/soak.py --minutes {args.minutes} --seed {args.seed} --grace {args.grace}"}
        try:
            plat.loraflow("up", timeout=900)
            first = plat.wait_run(plat.deployment_run("retrain/production"), 1800)
            assert first["state"]["type"] == "COMPLETED", first["state"]
            plat.wait_served(plat.champion(), 900)
            soak.say(f"v{plat.champion()} served; soak starts")
            soak.run(args.minutes)
            res["counts"] = soak.settle()
        finally:
            plat.loraflow("down", check=False)
        res["wall_s"] = round(time.time() - started)
        res["events"] = soak.log
    os.chdir(cwd)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res["counts"], indent=2))


if __name__ == "__main__":
    main()
