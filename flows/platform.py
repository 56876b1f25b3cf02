"""``loraflow up`` / ``down`` / ``status`` / ``service``: the platform on one machine, and in compose.

    loraflow up        # Prefect server, MLflow server, a Prefect worker, the endpoint; deployments created
    loraflow status    # services, deployments with their next run, champion vs served version
    loraflow down      # stop everything `up` started (vLLM and flow runs included); data stays

Process supervision lives in ``pipeline/platform`` (no Prefect); this module adds what needs Prefect: the
work pool, the retrain concurrency limit, the deployments and their triggers, the worker's health.
After ``up``, ``prefect.toml`` in the project root points every ``prefect`` command run here (any shell) at
the server; ``down`` removes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import httpx

from pipeline.config import TRACKING_URI_ENV, Params
from pipeline.platform import supervisor
from pipeline.platform.services import (SERVICE_NAMES, Platform, Service, ensure_databases, load_secrets,
                                        redact_url, services)

PREFECT_TOML = "prefect.toml"
TOML_MARK = "# written by `loraflow up`; `loraflow down` removes it"
DRIFT_EVENT = "loraflow.drift.detected"


def retrain_limit_name(model: str) -> str:
    return f"loraflow-retrain-{model}"


def platform_of(p: Params, params_file: str, root: Path | None = None) -> Platform:
    return Platform(p, params_file, (root or Path.cwd()).resolve())


# ---------------------------------------------------------------- Prefect objects (pool, limit, deployments)

def deployment_specs(plat: Platform) -> list[dict]:
    """What ``up`` (and the compose worker) deploy: one source for both. Parameters name the params file
    and the model, so another environment is configuration (its params file), not an edit."""
    p, cfg = plat.p, plat.cfg
    model = p.project.name
    retrain_schedules = [{"cron": cfg.retrain_cron, "timezone": cfg.timezone}] if cfg.retrain_cron else []
    drift_schedules = [{"interval": cfg.drift_check_minutes * 60}] if cfg.drift_check_minutes else []
    specs = [
        {"flow": "retrain", "name": "production", "entrypoint": "flows/retrain.py:retrain",
         "description": "Retrain on the current data version; promotes only through the gate. Weekly, and on "
                        f"{DRIFT_EVENT} (cooldown {cfg.drift_cooldown_minutes:g} min).",
         "parameters": {"params_file": plat.params_file, "model": model},
         "schedules": retrain_schedules,
         "trigger": {"expect": [DRIFT_EVENT], "match": {"prefect.resource.id": f"mlflow.model.{model}"},
                     "parameters": {"params_file": plat.params_file, "model": model, "trigger": "drift",
                                    "drift_summary": "{{ event.payload.summary }}"}}},
        {"flow": "drift-check", "name": "production", "entrypoint": "flows/monitor.py:drift_check",
         "description": "Evidently drift on the newest window of served traffic; emits "
                        f"{DRIFT_EVENT} once per drifted window.",
         "parameters": {"params_file": plat.params_file, "model": model},
         "schedules": drift_schedules, "trigger": None},
    ]
    if cfg.gpu_stages:
        specs.append({"flow": "stage", "name": "gpu", "entrypoint": "flows/retrain.py:stage",
                      "description": f"One DVC stage as its own flow run ({', '.join(cfg.gpu_stages)}): on "
                                     "Kubernetes in a GPU pod. The retrain runs it and waits.",
                      "parameters": {"params_file": plat.params_file, "stage": cfg.gpu_stages[0]},
                      "schedules": [], "trigger": None, "kind": "gpu"})
    kinds = [spec.pop("kind", "cpu") for spec in specs]
    if cfg.work_pool_type != "kubernetes":
        return [{**spec, "job_variables": {"working_dir": str(plat.root)}} for spec in specs]
    from flows.kubernetes import job_variables

    return [{**spec, "job_variables": job_variables(cfg.kubernetes, kind)} for spec, kind in zip(specs, kinds)]


def _spec_tag(spec: dict, root: Path) -> str:
    blob = json.dumps({**spec, "root": str(root)}, sort_keys=True, default=str)
    return "loraflow-spec-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure_prefect_objects(plat: Platform, say: Callable[[str], None] = print) -> list[str]:
    """Work pool, per-model retrain concurrency limit (1) and the deployments; idempotent. Returns what
    changed (empty: everything already as configured)."""
    from prefect import Flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
    from prefect.events import DeploymentEventTrigger
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    changed = []
    pool = plat.cfg.work_pool
    with get_client(sync_client=True) as client:
        kind = plat.cfg.work_pool_type
        if kind == "kubernetes":
            from flows.kubernetes import base_job_template

            template = base_job_template(plat.cfg.kubernetes)
        else:
            template = ProcessWorker.get_default_base_job_template()
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type=kind, base_job_template=template))
            changed.append(f"work pool {pool} ({kind}) created")
        limit = retrain_limit_name(plat.p.project.name)
        try:
            client.read_global_concurrency_limit_by_name(limit)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
            changed.append(f"concurrency limit {limit} = 1 created")
        for spec in deployment_specs(plat):
            full = f"{spec['flow']}/{spec['name']}"
            tag = _spec_tag(spec, plat.root)
            try:
                existing = client.read_deployment_by_name(full)
                if tag in (existing.tags or []) and existing.work_pool_name == pool:
                    continue
            except ObjectNotFound:
                existing = None
            flow = Flow.from_source(str(plat.root), spec["entrypoint"])
            trig = spec["trigger"]
            triggers = [DeploymentEventTrigger(name=f"{full} on drift", expect=set(trig["expect"]),
                                               match=trig["match"], parameters=trig["parameters"])] if trig else []
            schedules = []
            for s in spec["schedules"]:
                schedules.append(CronSchedule(cron=s["cron"], timezone=s["timezone"]) if "cron" in s
                                 else IntervalSchedule(interval=timedelta(seconds=s["interval"])))
            dep = flow.to_deployment(name=spec["name"], description=spec["description"], parameters=spec["parameters"],
                                     schedules=schedules, triggers=triggers, tags=["loraflow", tag],
                                     job_variables=spec["job_variables"])
            dep.apply(work_pool_name=pool)
            changed.append(f"deployment {full} {'updated' if existing else 'created'}")
    for line in changed:
        say(f"  {line}")
    return changed


def worker_online(plat: Platform, since: float = 0.0) -> bool:
    """A worker polls the work pool, with a heartbeat after ``since`` (unix time: a worker that just stopped
    still shows ONLINE for a while). Prefect's REST API, as the UI asks."""
    from datetime import datetime

    try:
        r = httpx.post(f"{plat.prefect_api_url}/work_pools/{plat.cfg.work_pool}/workers/filter", json={}, timeout=5)
        if r.status_code != 200:
            return False
        return any(w.get("status") == "ONLINE" and w.get("last_heartbeat_time")
                   and datetime.fromisoformat(w["last_heartbeat_time"].replace("Z", "+00:00")).timestamp() >= since
                   for w in r.json())
    except (httpx.HTTPError, ValueError):
        return False


# ---------------------------------------------------------------- prefect.toml: `prefect` commands find the server

def write_prefect_toml(plat: Platform) -> None:
    path = plat.root / PREFECT_TOML
    if path.exists() and TOML_MARK not in path.read_text(encoding="utf-8"):
        raise supervisor.PlatformError(f"{path} exists and was not written by loraflow; add "
                                       f"[api] url = \"{plat.prefect_api_url}\" to it yourself or move it away")
    path.write_text(f"{TOML_MARK}\n[api]\nurl = \"{plat.prefect_api_url}\"\n\n[server.analytics]\nenabled = false\n",
                    encoding="utf-8")


def remove_prefect_toml(root: Path) -> None:
    path = root / PREFECT_TOML
    if path.is_file() and TOML_MARK in path.read_text(encoding="utf-8"):
        path.unlink()


def platform_env(state_dir: Path) -> dict[str, str]:
    """The servers of a running platform (``up``'s record), for CLI commands run beside it; empty if none
    (or if its MLflow server is no longer running: then the store is used directly, as without ``up``)."""
    info = state_dir / "run" / "platform.json"
    if not info.is_file():
        return {}
    try:
        data = json.loads(info.read_text(encoding="utf-8"))
        running = supervisor.alive(supervisor.read_record(Path(data["run_dir"]), "mlflow"))
    except (OSError, ValueError, KeyError, supervisor.PlatformError):
        return {}
    return data.get("client_env", {}) if running else {}


# ---------------------------------------------------------------- up / down / status

def _check(plat: Platform, svc: Service, record: dict) -> Callable[[], bool]:
    if svc.name == "worker":
        return lambda: worker_online(plat, since=record["started"] - 1)
    return lambda: supervisor.http_ok(svc.health)


def up(plat: Platform, say: Callable[[str], None] = print) -> dict:
    """Start whatever is not running, create what is missing, wait for every health check."""
    started_at = time.monotonic()
    vllm_python = Path(plat.p.serve.python)
    vllm_python = vllm_python if vllm_python.is_absolute() else plat.root / vllm_python
    if plat.cfg.serve and not plat.p.serve.attached and not vllm_python.exists():
        raise supervisor.PlatformError(f"serve.python: {plat.p.serve.python} not found: create vLLM's environment "
                                       "with `make vllm-env` (or set platform.serve: false, or serve.url)")
    if plat.database_url:
        created = ensure_databases(plat.database_url)
        say(f"database: PostgreSQL {redact_url(plat.database_url)}"
            + (f" (created {', '.join(created)})" if created else ""))
    secret = load_secrets(plat.state_dir)
    svcs = services(plat, secret)
    run_dir = plat.run_dir
    base_env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    started, lines = [], []

    def bring(batch: list[Service]) -> None:
        records = {}
        for svc in batch:
            record = supervisor.read_record(run_dir, svc.name)
            if supervisor.alive(record):
                records[svc.name] = (record, False)
            else:
                records[svc.name] = (supervisor.start(svc, run_dir, plat.cfg.host if svc.name != "serve"
                                                      else plat.p.serve.gateway_host, base_env), True)
                started.append(svc.name)
        for svc in batch:
            record, new = records[svc.name]
            waited = supervisor.wait_ready(svc, record, _check(plat, svc, record), plat.cfg.startup_timeout_s, say)
            state = f"started, healthy after {waited:.1f}s" if new else "already running"
            lines.append(f"{svc.name:<15} {svc.url:<34} pid {record['pid']:<7} {state}")

    try:
        bring([s for s in svcs if s.name in ("prefect-server", "mlflow")])
        write_prefect_toml(plat)
        os.environ["PREFECT_API_URL"] = plat.prefect_api_url
        changed = ensure_prefect_objects(plat)
        bring([s for s in svcs if s.name not in ("prefect-server", "mlflow")])
    except BaseException:
        for name in reversed(started):  # what this call started goes; what ran before stays
            supervisor.stop(run_dir, name)
        if not any(supervisor.alive(supervisor.read_record(run_dir, n)) for n in SERVICE_NAMES):
            remove_prefect_toml(plat.root)
        raise
    client_env = {"PREFECT_API_URL": plat.prefect_api_url, TRACKING_URI_ENV: plat.mlflow_url}
    (run_dir / "platform.json").write_text(json.dumps({"run_dir": str(run_dir), "client_env": client_env,
                                                       "gateway": plat.gateway_url}, indent=2), encoding="utf-8")
    for line in lines:
        say(line)
    if not started and not changed:
        say("everything was already up and configured: nothing changed")
    return {"started": started, "changed": changed, "seconds": round(time.monotonic() - started_at, 1)}


def down(plat: Platform, say: Callable[[str], None] = print) -> dict:
    results = {}
    for name in reversed(SERVICE_NAMES):
        results[name] = supervisor.stop(plat.run_dir, name)
        say(f"{name:<15} {results[name]}")
    (plat.run_dir / "platform.json").unlink(missing_ok=True)
    remove_prefect_toml(plat.root)
    ports = [plat.cfg.prefect_port, plat.cfg.mlflow_port, plat.p.serve.gateway_port, plat.p.serve.port]
    busy = {port: who for port in ports if (who := supervisor.listener("127.0.0.1", port))}
    for port, who in busy.items():
        say(f"warning: port {port} is still in use by {who} (not started by loraflow up)")
    return {"stopped": results, "busy_ports": busy}


def status(plat: Platform) -> dict:
    """Services (up/down, URL, PID) and deployments (next scheduled run)."""
    urls = {"worker": f"work pool {plat.cfg.work_pool}"}
    out = {"services": [], "deployments": []}
    for st in supervisor.states(plat.run_dir, list(SERVICE_NAMES), urls):
        out["services"].append({"name": st.name, "up": st.running, "url": st.url, "pid": st.pid})
    if supervisor.http_ok(f"{plat.prefect_api_url}/health"):
        out["deployments"] = _deployments(plat)
    return out


def _deployments(plat: Platform) -> list[dict]:
    api = plat.prefect_api_url
    rows = []
    try:
        deps = httpx.post(f"{api}/deployments/filter", json={"limit": 50}, timeout=10).json()
        flows = {f["id"]: f["name"] for f in httpx.post(f"{api}/flows/filter", json={"limit": 200}, timeout=10).json()}
        for d in deps:
            runs = httpx.post(f"{api}/flow_runs/filter", timeout=10, json={
                "deployments": {"id": {"any_": [d["id"]]}}, "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                "sort": "EXPECTED_START_TIME_ASC", "limit": 1}).json()
            rows.append({"name": f"{flows.get(d['flow_id'], '?')}/{d['name']}",
                         "next_run": runs[0]["expected_start_time"] if runs else None,
                         "paused": d.get("paused", False)})
    except (httpx.HTTPError, ValueError, KeyError) as err:
        rows.append({"name": f"<could not read deployments: {err}>", "next_run": None, "paused": None})
    return rows


def wait_for_prefect(api_url: str, timeout_s: float, say: Callable[[str], None] = print) -> None:
    """Until the Prefect server answers (compose starts the worker beside it)."""
    deadline = time.monotonic() + timeout_s
    while not supervisor.http_ok(f"{api_url}/health"):
        if time.monotonic() > deadline:
            raise supervisor.PlatformError(f"the Prefect server at {api_url} did not answer within {timeout_s:.0f}s")
        say(f"waiting for the Prefect server at {api_url}")
        time.sleep(3)
