"""The ``drift-check`` flow: Evidently drift report on served traffic, logged to MLflow.

    loraflow drift

On drift it emits the Prefect event ``loraflow.drift.detected``; the ``retrain/production`` deployment in
prefect.yaml has a trigger on that event, so with a Prefect server a retrain starts without polling.
Without a server (laptop, ephemeral Prefect) ``monitor.retrain_on_drift: true`` runs ``retrain`` as a
subflow instead; keep it false where the deployment trigger exists, or a drift retrains twice.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.events import emit_event

from pipeline.release import registry
from pipeline.config import load_params
from pipeline.monitor.drift import check_drift
from pipeline.stages import augmented_file


@task(name="evidently-drift")
def drift_report(train_file: str, traffic_log: str, cfg, task_cfg, model: str | None = None) -> dict:
    return check_drift(Path(train_file), Path(traffic_log), cfg, task_cfg, model)


@flow(name="drift-check", log_prints=True)
def drift_check(params_file: str = "params.yaml") -> dict:
    p = load_params(params_file)
    logger = get_run_logger()
    result = drift_report(str(augmented_file(p)), p.serve.traffic_log, p.monitor, p.task, p.project.name)
    if result["status"] != "ok":
        logger.warning("drift check skipped: %s requests < min_requests %s", result["requests"],
                       result["min_requests"])
        return result
    run_id = registry.log_report(
        p.registry, "drift-check",
        files={"drift": Path(p.monitor.out_dir) / "drift.html", "drift_json": Path(p.monitor.out_dir) / "drift.json"},
        metrics={"drift_share": result["drift_share"], "drifted_columns": result["drifted_columns"],
                 "requests": result["requests"]},
        tags={"loraflow.kind": "drift-check", "model": p.project.name})
    result["mlflow_run_id"] = run_id
    logger.info("drift share %.2f (threshold %.2f): %s", result["drift_share"], result["threshold"],
                "DRIFT" if result["drift"] else "no drift")
    if result["drift"]:
        emit_event("loraflow.drift.detected", resource={"prefect.resource.id": f"mlflow.model.{p.project.name}"},
                   payload={"drift_share": result["drift_share"], "requests": result["requests"]})
        if p.monitor.retrain_on_drift:
            from flows.retrain import retrain

            logger.info("monitor.retrain_on_drift: running the retrain flow now")
            result["retrain"] = retrain(params_file=params_file)
    return result
