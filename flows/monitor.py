"""The ``drift-check`` flow: Evidently drift on the newest window of served traffic, logged to MLflow.

    loraflow drift
    prefect deployment run drift-check/production     # after `loraflow up` (also on its interval)

Each check judges the requests logged since the previous judged window (pipeline/monitor/drift.py), so
one burst of drifted traffic fires ``loraflow.drift.detected`` once. The ``retrain/production`` deployment
(flows/platform.py) is triggered by that event. Without a server (laptop, ephemeral Prefect)
``monitor.retrain_on_drift: true`` runs ``retrain`` as a subflow instead; keep it false where the
deployment trigger exists, or a drift retrains twice.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.events import emit_event

from pipeline.config import ConfigError, load_params
from pipeline.monitor.drift import check_drift, commit_window, window_id
from pipeline import registry
from pipeline.layout import augmented_file


def send_event(event: str, resource: dict, payload: dict, event_id: uuid.UUID, timeout_s: float = 60) -> None:
    """Send one event and return only once the server confirmed it, or raise. ``emit_event`` queues to a
    background worker that logs and drops what it cannot send: a drift trigger must not be lost that way.
    Without a server (ephemeral Prefect) there is no trigger to reach; ``emit_event`` is all there is."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        emit_event(event, resource=resource, payload=payload, id=event_id)
        return
    from prefect.events import Event
    from prefect.events.clients import PrefectEventsClient
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def send() -> None:
        # checkpoint_every=1: a ping after the send, answered only once the server has read the event.
        async with PrefectEventsClient(reconnection_attempts=3, checkpoint_every=1) as client:
            await client.emit(Event(event=event, resource=resource, payload=payload, id=event_id))

    async def bounded() -> None:
        await asyncio.wait_for(send(), timeout_s)

    run_coro_as_sync(bounded())


@task(name="evidently-drift")
def drift_report(train_file: str, traffic_log: str, cfg, task_cfg, model: str | None = None) -> dict:
    return check_drift(Path(train_file), Path(traffic_log), cfg, task_cfg, model)


def drift_summary(result: dict) -> str:
    """One line for people and for the retrain it triggers."""
    w = result["window"]
    drifted = ", ".join(result["drifted"]) or "none"
    return (f"drift share {result['drift_share']:.2f} >= {result['threshold']:.2f} over {result['requests']} requests "
            f"({w['start']} .. {w['end']}); drifted: {drifted}")


@flow(name="drift-check", log_prints=True)
def drift_check(params_file: str = "params.yaml", model: str = "") -> dict:
    p = load_params(params_file)
    if model and model != p.project.name:
        raise ConfigError(f"{params_file}: project.name is {p.project.name!r}, but this deployment checks {model!r}")
    logger = get_run_logger()
    result = drift_report(str(augmented_file(p)), p.serve.traffic_log, p.monitor, p.task, p.project.name)
    if result["status"] != "ok":
        logger.info("no verdict yet: %s new requests since the last judged window < min_requests %s",
                    result["requests"], result["min_requests"])
        return result
    out = Path(p.monitor.out_dir)
    w = result["window"]
    run_id = registry.log_report(
        p.registry, "drift-check",
        files={"drift": out / "drift.html", "drift_json": out / "drift.json"},
        metrics={"drift_share": result["drift_share"], "drifted_columns": result["drifted_columns"],
                 "requests": result["requests"]},
        tags={"loraflow.kind": "drift-check", "model": p.project.name, "drift": str(result["drift"]).lower(),
              "window_start": str(w["start"]), "window_end": str(w["end"]),
              "drifted": ",".join(result["drifted"])[:4000]})
    result["mlflow_run_id"] = run_id
    result["report"] = f"runs:/{run_id}/drift/drift.html"
    registry.set_run_tag(p.registry, run_id, "report_html", result["report"])
    logger.info("drift share %.2f (threshold %.2f) over %s requests: %s; report %s", result["drift_share"],
                result["threshold"], result["requests"], "DRIFT" if result["drift"] else "no drift", result["report"])
    if result["drift"]:
        result["summary"] = drift_summary(result)
        result["window_id"] = window_id(p.project.name, result)
        # The same window judged again (a failure below, before the commit) sends the same event id, which
        # Prefect's trigger service acts on once.
        send_event("loraflow.drift.detected", {"prefect.resource.id": f"mlflow.model.{p.project.name}"},
                   {"summary": result["summary"], "window": w, "window_id": result["window_id"],
                    "drift_share": result["drift_share"], "threshold": result["threshold"],
                    "drifted": result["drifted"], "scores": {c: v["score"] for c, v in result["columns"].items()},
                    "requests": result["requests"], "mlflow_run_id": run_id, "report": result["report"]},
                   uuid.uuid5(uuid.NAMESPACE_URL, f"loraflow.drift/{result['window_id']}"))
    # Judged only now: the run is logged and the trigger is out. Any failure before this line leaves the
    # window open, so the next check judges it again and the trigger comes back.
    commit_window(out, result)
    if result["drift"] and p.monitor.retrain_on_drift:
        from flows.retrain import retrain

        logger.info("monitor.retrain_on_drift: running the retrain flow now")
        result["retrain"] = retrain(params_file=params_file, trigger="drift", drift_summary=result["summary"])
    return result
