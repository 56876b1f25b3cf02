"""The evaluate stage: generate answers on the held-out split and score them with the task's metrics.

    python -m pipeline evaluate

For the base model and the candidate (base + adapter) it writes ``metrics.json`` (the per-metric summary,
DVC metrics) and ``details.json``: per-example values of every metric (the gate's paired comparisons use
them), the reason each unusable prediction scored 0, the predictions, and a few examples. A prediction
that cannot be parsed scores 0 with its reason; it never stops the stage.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import EvaluateConfig, TaskConfig
from pipeline.evaluate.generation import generate
from pipeline.io import load_chat_file, write_json
from pipeline.modeling import load_base
from pipeline.tasks import Task, build_task

SAMPLES = 5


def score_predictions(task: Task, predictions: list[str], rows: list[dict]) -> dict:
    """Summary, per-example values and reasons for ``predictions`` against ``rows``' references."""
    references = [r["completion"][-1]["content"] for r in rows]
    prompts = ["\n".join(m["content"] for m in r["prompt"]) for r in rows]
    scores = [task.score(p, ref, q) for p, ref, q in zip(predictions, references, prompts)]
    return {
        "n": len(rows),
        "summary": task.aggregate(scores, references),
        "per_example": {m: [s.values[m] for s in scores] for m in task.metrics},
        "reasons": [s.reason for s in scores],
        "predictions": predictions,
        "samples": [{"prompt": q, "reference": ref, "prediction": p, "scores": s.values, "reason": s.reason}
                    for q, ref, p, s in list(zip(prompts, references, predictions, scores))[:SAMPLES]],
    }


def evaluate_model(base_dir: Path, adapter_dir: Path | None, eval_file: Path, cfg: EvaluateConfig,
                   task_cfg: TaskConfig, task: Task | None = None) -> dict:
    """Score the base model (``adapter_dir=None``) or base + adapter on ``eval_file``."""
    task = task or build_task(task_cfg)
    model, tokenizer = load_base(base_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    rows = load_chat_file(eval_file)
    if cfg.max_examples:
        rows = rows[: cfg.max_examples]
    predictions = generate(model, tokenizer, [r["prompt"] for r in rows], task_cfg, cfg.batch_size)
    return score_predictions(task, predictions, rows)


def evaluate_stage(base_dir: Path, adapter_dir: Path, eval_file: Path, cfg: EvaluateConfig,
                   task_cfg: TaskConfig) -> dict:
    """Evaluate base and candidate; write ``metrics.json`` (DVC metrics) and ``details.json``."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = build_task(task_cfg)
    results = {name: evaluate_model(base_dir, adapter, eval_file, cfg, task_cfg, task)
               for name, adapter in (("base", None), ("candidate", adapter_dir))}
    metrics = {name: {"n": r["n"], **r["summary"]} for name, r in results.items()}
    write_json(out / "metrics.json", metrics)
    write_json(out / "details.json", {"task": task_cfg.name, "kind": task_cfg.kind, **results})
    return metrics
