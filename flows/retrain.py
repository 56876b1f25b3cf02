"""The ``retrain`` flow: DVC stages -> gate -> MLflow registry (serving follows the alias).

    loraflow run                                  # embedded defaults, ephemeral Prefect
    prefect deployment run retrain/production     # once deployed (prefect.yaml)

Each DVC stage is one task, so the Prefect UI shows which stages ran and which DVC skipped as unchanged.
Logic lives in ``pipeline/``; this module only wires it, adds retries and emits events.
"""

from __future__ import annotations

import contextlib
import os

from prefect import flow, get_run_logger, task
from prefect.events import emit_event

from pipeline import dvc_runner
from pipeline.release import promotion, registry
from pipeline.config import Params, load_params
from pipeline.release.lock import retrain_lock


@task(name="dvc-stage", retries=1, retry_delay_seconds=5, task_run_name="dvc-{stage}")
def run_stage(stage: str) -> dict:
    result = dvc_runner.repro(stage)
    get_run_logger().info("stage %s: %s in %.1fs", stage, "ran" if result.ran else "unchanged, skipped",
                          result.seconds)
    return {"ran": result.ran, "seconds": result.seconds}


@task(name="dvc-push", retries=2, retry_delay_seconds=5)
def push_outputs() -> int:
    return dvc_runner.push()


@task(name="gate-register-promote")
def release(p: Params) -> dict:
    """Gate, register and (if the gate passes) move the alias: one resumable transaction
    (pipeline/release/promotion.py)."""
    logger = get_run_logger()
    candidate, base = promotion.candidate_score(p)
    result = promotion.release(p, candidate, base, say=logger.info)
    resource = {"prefect.resource.id": f"mlflow.model.{p.project.name}"}
    if result["newly_registered"]:
        emit_event("loraflow.model.registered", resource=resource,
                   payload={"version": result["registered_version"], "promote": result["decision"]["promote"]})
    if result["promoted"] and result["note"] == "promoted":
        emit_event("loraflow.model.promoted", resource=resource,
                   payload={"version": result["registered_version"], "alias": p.registry.alias})
    return {**result, "candidate": candidate.metrics, "base": base.metrics}


@contextlib.contextmanager
def _prefect_limit(name: str):
    """With a Prefect server, a global concurrency limit of 1 per model: retrains on other machines (one
    MLflow, several workers) wait too. Ephemeral Prefect has no other runs to exclude."""
    if not os.environ.get("PREFECT_API_URL"):
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


@flow(name="retrain", log_prints=True)
def retrain(params_file: str = "params.yaml") -> dict:
    """Reproduce the data/model stages, gate the candidate, register it and promote it if it wins.

    One retrain per model at a time (a file lock, plus a Prefect concurrency limit with a server): a
    cron run and a drift-triggered run never both register. Serving is not this flow's business:
    `loraflow serve` follows the alias (webhook + polling)."""
    p = load_params(params_file)  # invalid params stop the run here, before any work
    logger = get_run_logger()
    with retrain_lock(p.project.name, say=logger.info), _prefect_limit(f"loraflow-retrain-{p.project.name}"):
        stages = {name: run_stage(name) for name in dvc_runner.stage_names()}
        pushed = push_outputs() if p.dvc.push else None
        result = release(p)
    logger.info("%s v%s: %s", p.project.name, result["registered_version"], result["note"])
    champion = registry.get_alias(p.registry, p.project.name)
    return {"stages": stages, "dvc_pushed_files": pushed, **result,
            "champion": {"version": champion.version, "alias": p.registry.alias} if champion else None,
            "model_name": p.project.name}
