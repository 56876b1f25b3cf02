"""From an evaluated candidate to a registered, possibly promoted, model version.

The steps between the DVC stages and serving: score the reference (the current champion, re-evaluated
on today's held-out split, or the base model), run the gate, log the run and register the version with
its lineage and model card, and move the alias when the gate passes.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import Params
from pipeline.evaluate.scoring import evaluate_model
from pipeline.release.gate import Decision, ModelScore, decide
from pipeline.hashing import dir_sha256, file_sha256
from pipeline.io import load_chat_file, read_json, write_json
from pipeline.release import registry
from pipeline.release.lineage import dvc_lock_hashes, git_commit, params_sha256
from pipeline.stages import augmented_file, clean_split


def candidate_score(p: Params) -> tuple[ModelScore, ModelScore]:
    """The candidate's and the base model's scores, as the evaluate stage recorded them."""
    details = read_json(Path(p.evaluate.out_dir) / "details.json")
    return ModelScore.from_details("candidate", details["candidate"]), ModelScore.from_details("base", details["base"])


def champion_score(p: Params, champion: registry.VersionInfo) -> ModelScore | None:
    """Re-evaluate the champion on the current eval split (paired with the candidate's outcomes).

    None when the champion was trained on another base: its adapter cannot run on today's base.
    """
    base_dir = Path(p.base.out_dir)
    if champion.tags.get("base_sha256") != file_sha256(base_dir / "config.json") or \
            champion.tags.get("base_weights_sha256") != _weights_sha(base_dir):
        return None
    adapter = registry.download_adapter(p.registry, champion, Path(p.serve.adapters_dir))
    res = evaluate_model(base_dir, adapter, clean_split(p, "eval"), p.evaluate, p.task)
    return ModelScore.from_details(f"champion v{champion.version}", res)


def _weights_sha(base_dir: Path) -> str:
    weights = sorted(base_dir.glob("*.safetensors"))
    return file_sha256(weights[0]) if len(weights) == 1 else dir_sha256(base_dir)


def gate(p: Params, candidate: ModelScore, base: ModelScore) -> tuple[Decision, registry.VersionInfo | None]:
    champion = registry.get_alias(p.registry, p.project.name)
    reference = champion_score(p, champion) if champion else None
    if reference is not None:
        return decide(candidate, reference, p.gate, True, p.gate_metric), champion
    decision = decide(candidate, base, p.gate, False, p.gate_metric)
    if champion is not None:
        # Serving puts the alias's adapter on today's base, where an adapter of another base produces
        # garbage: such a champion is no reference, and the candidate clears the first-version bar.
        decision = Decision(decision.promote, decision.reference, decision.reasons + [
            f"champion v{champion.version} was trained on another base and cannot be served on this one: "
            "judged against the base model"], decision.metric)
    return decision, champion


def lineage_tags(p: Params) -> dict[str, str]:
    base_dir = Path(p.base.out_dir)
    tags = {f"dvc.{k}": v for k, v in dvc_lock_hashes().items()}
    tags.update({
        "git_commit": git_commit(),
        "params_sha256": params_sha256(p.model_dump()),
        "base_model": p.base.model,
        "base_sha256": file_sha256(base_dir / "config.json"),
        "base_weights_sha256": _weights_sha(base_dir),
        "train_data_sha256": file_sha256(augmented_file(p)),
        "eval_data_sha256": file_sha256(clean_split(p, "eval")),
        "task": p.task.name,
        "task_kind": p.task.kind,
        # Serving reads these: the task's generation settings and parser, and held-out prompts (sanitized,
        # so redacted) for the smoke test a version must pass before its name is routed to it.
        "task_config": p.task.model_dump_json(),
        "smoke_prompts": json.dumps(smoke_prompts(clean_split(p, "eval")), ensure_ascii=False),
    })
    return tags


SERVING_TAGS = ("task_config", "smoke_prompts")  # version tags only: run tags are capped at 8,000 chars


def smoke_prompts(eval_file: Path, n: int = 3, max_chars: int = 1500) -> list[list[dict]]:
    """The first ``n`` held-out prompts, each message cut to ``max_chars`` (MLflow tags are bounded)."""
    rows = load_chat_file(eval_file)[:n] if eval_file.is_file() and eval_file.stat().st_size else []
    return [[{**m, "content": m["content"][:max_chars]} for m in r["prompt"]] for r in rows]


def register_candidate(p: Params, decision: Decision, candidate: ModelScore, base: ModelScore) -> registry.VersionInfo:
    adapter_dir = Path(p.train.out_dir)
    train_metrics = read_json(adapter_dir / "train_metrics.json")
    n = len(next(iter(candidate.per_example.values()), []))
    eval_metrics = {"base": {**base.metrics, "n": n}, "candidate": {**candidate.metrics, "n": n}}
    tags = {**lineage_tags(p), "adapter_sha256": dir_sha256(adapter_dir),
            "gate_promote": str(decision.promote).lower(), "gate_reference": decision.reference}
    data_card = Path(p.sanitize.out_dir, "train", "data_card.md").read_text(encoding="utf-8")
    card = registry.model_card(name=p.project.name, params=p.model_dump(), task=p.task, eval_metrics=eval_metrics,
                               decision=decision.to_dict(), data_card=data_card,
                               lineage={k: v for k, v in tags.items()
                                        if not k.startswith("gate_") and k not in SERVING_TAGS},
                               train_metrics=train_metrics)
    card_path = Path("reports/model_card.md")
    card_path.parent.mkdir(parents=True, exist_ok=True)
    card_path.write_text(card, encoding="utf-8")
    decision_path = Path("reports/gate.json")
    write_json(decision_path, decision.to_dict())
    run_id = registry.log_candidate(
        p.registry, run_name=f"retrain-{tags['adapter_sha256'][:8]}", params=p.model_dump(),
        adapter_dir=adapter_dir, train_metrics=train_metrics, eval_metrics=eval_metrics,
        artifacts={"reports": card_path, "gate": decision_path,
                   "data": Path(p.sanitize.out_dir, "train", "report.json"),
                   "data_eval": Path(p.sanitize.out_dir, "eval", "report.json"),
                   "augment": Path(p.augment.out_dir, "report.json"),
                   "eval": Path(p.evaluate.out_dir, "details.json")},
        tags={k: v for k, v in tags.items() if not k.startswith("dvc.") and k not in SERVING_TAGS},
    )
    return registry.register(p.registry, p.project.name, run_id, tags, card)
