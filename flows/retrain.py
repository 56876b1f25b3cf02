"""The ``retrain`` flow: DVC stages -> gate -> MLflow registry (serving follows the alias).

    loraflow run                                  # embedded defaults, ephemeral Prefect
    prefect deployment run retrain/production     # once deployed (prefect.yaml)

Each DVC stage is one task, so the Prefect UI shows which stages ran and which DVC skipped as unchanged.
Logic lives in ``pipeline/``; this module only wires it, adds retries and emits events.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.events import emit_event

from pipeline import dvc_runner
from pipeline.release import promotion, registry
from pipeline.config import Params, load_params
from pipeline.release.gate import Decision, ModelScore
from pipeline.hashing import dir_sha256


@task(name="dvc-stage", retries=1, retry_delay_seconds=5, task_run_name="dvc-{stage}")
def run_stage(stage: str) -> dict:
    result = dvc_runner.repro(stage)
    get_run_logger().info("stage %s: %s in %.1fs", stage, "ran" if result.ran else "unchanged, skipped",
                          result.seconds)
    return {"ran": result.ran, "seconds": result.seconds}


@task(name="dvc-push", retries=2, retry_delay_seconds=5)
def push_outputs() -> int:
    return dvc_runner.push()


@task(name="gate")
def gate(p: Params) -> dict:
    candidate, base = promotion.candidate_score(p)
    scores = {"candidate": candidate, "base": base}
    existing = registry.find_version_by_adapter(p.registry, p.project.name, dir_sha256(Path(p.train.out_dir)))
    if existing is not None:
        return {"existing_version": existing.version, "decision": None, **scores}
    decision, champion = promotion.gate(p, candidate, base)
    return {"existing_version": None, "decision": decision, "champion": champion, **scores}


@task(name="register")
def register(p: Params, decision: Decision, candidate: ModelScore, base: ModelScore) -> registry.VersionInfo:
    info = promotion.register_candidate(p, decision, candidate, base)
    emit_event("loraflow.model.registered", resource={"prefect.resource.id": f"mlflow.model.{info.name}"},
               payload={"version": info.version, "promote": decision.promote})
    return info


@task(name="promote")
def promote(p: Params, version: int) -> registry.VersionInfo:
    info = registry.promote(p.registry, p.project.name, version)
    emit_event("loraflow.model.promoted", resource={"prefect.resource.id": f"mlflow.model.{info.name}"},
               payload={"version": info.version, "alias": p.registry.alias})
    return info


@flow(name="retrain", log_prints=True)
def retrain(params_file: str = "params.yaml") -> dict:
    """Reproduce the data/model stages, gate the candidate, register it and promote it if it wins.

    Serving is not this flow's business: `loraflow serve` follows the alias (webhook + polling)."""
    p = load_params(params_file)  # invalid params stop the run here, before any work
    logger = get_run_logger()
    stages = {name: run_stage(name) for name in dvc_runner.stage_names()}
    pushed = push_outputs() if p.dvc.push else None
    g = gate(p)
    summary: dict = {"stages": stages, "dvc_pushed_files": pushed, "candidate": g["candidate"].metrics,
                     "base": g["base"].metrics}
    if g["existing_version"] is not None:
        logger.info("adapter unchanged: already registered as version %s; nothing to register",
                    g["existing_version"])
        summary.update(registered_version=g["existing_version"], newly_registered=False,
                       decision={"promote": False, "reasons": ["candidate already registered"]})
    else:
        decision = g["decision"]
        for reason in decision.reasons:
            logger.info("gate: %s", reason)
        info = register(p, decision, g["candidate"], g["base"])
        summary.update(registered_version=info.version, newly_registered=True, decision=decision.to_dict())
        if decision.promote:
            promote(p, info.version)
    champion = registry.get_alias(p.registry, p.project.name)
    summary["champion"] = {"version": champion.version, "alias": p.registry.alias} if champion else None
    summary["model_name"] = p.project.name
    return summary
