"""The ``retrain`` flow: DVC stages -> gate -> MLflow registry (serving follows the alias).

    loraflow run                                  # embedded defaults (or the servers of `loraflow up`)
    prefect deployment run retrain/production     # after `loraflow up` (flows/platform.py deploys it)

It trains on the current data version (what params.yaml lists, versioned by DVC). When no input changed
since the last registered version it ends in the state ``NoNewData`` ("no new data since v<N>"), with an
event, instead of pretending to have done something. A drift-triggered run (``trigger="drift"``) does
nothing within ``platform.drift_cooldown_minutes`` of the last drift-triggered run that trained (state
``Cooldown``). It first runs the ``curate`` stage (served traffic and feedback -> new records): with fewer
than ``curate.min_new_records`` new curated records since the latest registered version it ends in the
state ``WaitingForFeedback`` ("waiting for feedback: k of n"), since retraining on unchanged data cannot fix
drift; with enough it trains, and the gate also scores the held-out slice of the curated traffic.

Each DVC stage is one task, so the Prefect UI shows which stages ran and which DVC skipped as unchanged.
Logic lives in ``pipeline/``; this module only wires it, adds retries and emits events.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from datetime import datetime, timedelta, timezone

from prefect import flow, get_run_logger, task
from prefect.events import emit_event
from prefect.states import Completed

from pipeline import dvc_runner
from pipeline import registry
from pipeline.release import dossier, promotion
from pipeline.stages import rescorer
from pipeline.train.trl_args import check_trl_keys
from pipeline.config import ConfigError, Params, load_params
from pipeline.release.lock import retrain_lock
from pipeline.io import write_json
from flows.feedback import feedback_progress
from pipeline.layout import serving_log

QUIET_STATES = ("NoNewData", "Cooldown", "WaitingForFeedback")  # drift-triggered runs that trained nothing (the cooldown ignores them)


@task(name="dvc-stage", retries=1, retry_delay_seconds=5, task_run_name="dvc-{stage}")
def run_stage(stage: str) -> dict:
    result = dvc_runner.repro(stage)
    get_run_logger().info("stage %s: %s in %.1fs", stage, "ran" if result.ran else "unchanged, skipped",
                          result.seconds)
    return {"ran": result.ran, "seconds": result.seconds}


STAGE_RESULTS = Path("reports/stages")  # a stage run as its own flow run leaves its outcome here (shared volume)


@flow(name="stage", log_prints=True)
def stage(stage: str, params_file: str = "params.yaml") -> dict:
    """One DVC stage as a flow run of its own: deployment ``stage/gpu`` runs the stages in
    ``platform.gpu_stages`` (in a GPU pod on Kubernetes, on the workspace volume the retrain shares)."""
    load_params(params_file)  # the same validation as the retrain, in this pod
    result = dvc_runner.repro(stage)
    out = {"ran": result.ran, "seconds": result.seconds}
    write_json(STAGE_RESULTS / f"{stage}.json", out)
    get_run_logger().info("stage %s: %s in %.1fs", stage, "ran" if result.ran else "unchanged, skipped",
                          result.seconds)
    return out


@task(name="gpu-stage", retries=1, retry_delay_seconds=30, task_run_name="gpu-{name}")
def run_gpu_stage(name: str, params_file: str, timeout_s: float) -> dict:
    """Run ``name`` through deployment ``stage/gpu`` and wait for it (a GPU pod on Kubernetes does the
    work). A crashed or evicted run is retried once; training resumes from its checkpoint."""
    from prefect.deployments import run_deployment

    (STAGE_RESULTS / f"{name}.json").unlink(missing_ok=True)
    run = run_deployment("stage/gpu", parameters={"stage": name, "params_file": params_file}, timeout=timeout_s,
                         as_subflow=True)
    if run.state is None or not run.state.is_final():
        raise TimeoutError(f"stage {name} (flow run {run.name}) did not finish within platform.gpu_stage_timeout_s "
                           f"= {timeout_s:g} s")
    if not run.state.is_completed():
        raise RuntimeError(f"stage {name} (flow run {run.name}, deployment stage/gpu) ended {run.state.name}: "
                           f"{run.state.message or ''}")
    return {**json.loads((STAGE_RESULTS / f"{name}.json").read_text()), "flow_run": run.name}


@task(name="dvc-push", retries=2, retry_delay_seconds=5)
def push_outputs() -> int:
    return dvc_runner.push()


@task(name="gate-register-promote")
def release(p: Params) -> dict:
    """Gate, register and (if the gate passes) move the alias: one resumable transaction
    (pipeline/release/promotion.py)."""
    logger = get_run_logger()
    candidate, base = promotion.candidate_score(p)
    result = promotion.release(p, candidate, base, rescorer(p), say=logger.info)
    resource = {"prefect.resource.id": f"mlflow.model.{p.project.name}"}
    if result["newly_registered"]:
        emit_event("loraflow.model.registered", resource=resource,
                   payload={"version": result["registered_version"], "promote": result["decision"]["promote"]})
    if result["promoted"] and result["note"] == "promoted":
        emit_event("loraflow.model.promoted", resource=resource,
                   payload={"version": result["registered_version"], "alias": p.registry.alias})
    return {**result, "candidate": candidate.metrics, "base": base.metrics}


@task(name="dossier", retries=2, retry_delay_seconds=5)
def write_dossier(p: Params, version: int) -> str:
    """The new version's compliance dossier, logged to its run (pipeline/release/dossier.py)."""
    md, page = dossier.publish(p.registry, p.project.name, version, Path("reports/dossier"), serving_log(p))
    get_run_logger().info("dossier of v%s: %s", version, page)
    return str(page)


@contextlib.contextmanager
def _prefect_limit(name: str):
    """With a Prefect server, a global concurrency limit of 1 per model: retrains on other machines (one
    MLflow, several workers) wait too. Ephemeral Prefect has no other runs to exclude. The API URL is
    Prefect's resolved setting (environment, prefect.toml or the active profile), not just the variable."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except Exception:  # noqa: BLE001 - missing: create it (a concurrent creator wins the same way)
            with contextlib.suppress(Exception):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    with concurrency(name, occupy=1, strict=True):
        yield


def _last_drift_retrain(cooldown_min: float) -> dict | None:
    """The latest other drift-triggered retrain that started within the cooldown and trained (or is still
    running); None when there is none. Read from the Prefect API, so every worker sees the same answer."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter,
                                                FlowRunFilterStartTime)
    from prefect.runtime import flow_run

    since = datetime.now(timezone.utc) - timedelta(minutes=cooldown_min)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain"])),
                                     flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)),
                                     limit=200)
    for run in sorted(runs, key=lambda r: r.start_time or since, reverse=True):
        if str(run.id) == str(flow_run.id) or (run.parameters or {}).get("trigger") != "drift" or run.state is None:
            continue
        if run.state.name in QUIET_STATES or run.state.type.value not in ("RUNNING", "COMPLETED"):
            continue
        return {"id": str(run.id), "name": run.name, "started": run.start_time.isoformat(), "state": run.state.name}
    return None


@flow(name="retrain", log_prints=True)
def retrain(params_file: str = "params.yaml", model: str = "", trigger: str = "manual", drift_summary: str = ""):
    """Reproduce the data/model stages, gate the candidate, register it and promote it if it wins.

    One retrain per model at a time (a file lock, plus a Prefect concurrency limit with a server): a
    cron run and a drift-triggered run never both register. Serving is not this flow's business:
    `loraflow serve` follows the alias (webhook + polling). ``model`` (the deployment's) must be the params
    file's project.name; ``trigger``/``drift_summary`` say why it runs (the drift trigger fills them)."""
    p = load_params(params_file)  # invalid params stop the run here, before any work
    check_trl_keys(p.train, params_file)
    if model and model != p.project.name:
        raise ConfigError(f"{params_file}: project.name is {p.project.name!r}, but this deployment retrains {model!r}")
    logger = get_run_logger()
    resource = {"prefect.resource.id": f"mlflow.model.{p.project.name}"}
    if trigger == "drift":
        logger.info("triggered by drift: %s", drift_summary or "(no summary)")
        last = _last_drift_retrain(p.platform.drift_cooldown_minutes) if p.platform.drift_cooldown_minutes else None
        if last:
            msg = (f"cooldown: drift-triggered retrain {last['name']} started {last['started']}, within "
                   f"{p.platform.drift_cooldown_minutes:g} min; nothing done")
            logger.info(msg)
            emit_event("loraflow.retrain.cooldown", resource=resource, payload={"last": last, "drift": drift_summary})
            return Completed(name="Cooldown", message=msg, data={"outcome": "cooldown", "message": msg, "last": last})
    with retrain_lock(p.project.name, say=logger.info), _prefect_limit(f"loraflow-retrain-{p.project.name}"):
        stages: dict[str, dict] = {}
        if trigger == "drift" and p.curate.enabled:
            # Asked before curate runs: inputs a person changed (data, params, code) train anyway.
            changed = dvc_runner.changed_inputs(ignore_paths=(p.curate.out_dir,))
            stages["curate"] = run_stage("curate")
            progress = feedback_progress(p)
            if changed:
                logger.info("inputs changed besides feedback (%s): retraining", ", ".join(sorted(changed)))
            elif progress["new"] < progress["needed"]:
                msg = progress["message"] + (f"; drift: {drift_summary}" if drift_summary else "")
                logger.info(msg)
                emit_event("loraflow.retrain.waiting-for-feedback", resource=resource,
                           payload={**progress, "drift": drift_summary})
                return Completed(name="WaitingForFeedback", message=msg,
                                 data={"outcome": "waiting_for_feedback", "message": msg, **progress})
            logger.info("drift with %s: retraining", progress["message"])
        names = dvc_runner.stage_names()
        unknown = sorted(set(p.platform.gpu_stages) - set(names))
        if unknown:
            raise ConfigError(f"{params_file}: platform.gpu_stages: {unknown} are not stages of dvc.yaml ({names})")
        for name in names:
            if name in stages:
                continue
            if name in p.platform.gpu_stages:
                stages[name] = run_gpu_stage(name, params_file, p.platform.gpu_stage_timeout_s)
            else:
                stages[name] = run_stage(name)
        pushed = push_outputs() if p.dvc.push else None
        result = release(p)
        # Every run, not only the registering one: a run that resumes an interrupted release writes it too.
        result["dossier"] = write_dossier(p, result["registered_version"])
        result["bases_removed"] = promotion.prune_bases(p, say=logger.info)
    champion = registry.get_alias(p.registry, p.project.name)
    summary = {"stages": stages, "dvc_pushed_files": pushed, **result, "trigger": trigger,
               "champion": {"version": champion.version, "alias": p.registry.alias} if champion else None,
               "model_name": p.project.name}
    # A version re-gated under changed gate settings is news even though no stage ran.
    if not any(s["ran"] for s in stages.values()) and not result["newly_registered"] and not result.get("regated"):
        msg = (f"no new data since v{result['registered_version']}: every stage is unchanged "
               f"(champion {'v%s' % champion.version if champion else 'none'})")
        if drift_summary:
            msg += f"; drift: {drift_summary}"
        logger.info(msg)
        emit_event("loraflow.retrain.no-new-data", resource=resource,
                   payload={"version": result["registered_version"], "trigger": trigger, "drift": drift_summary})
        return Completed(name="NoNewData", message=msg, data={**summary, "outcome": "no_new_data", "message": msg})
    logger.info("%s v%s: %s", p.project.name, result["registered_version"], result["note"])
    return {**summary, "outcome": "registered" if result["newly_registered"] else result["note"]}
