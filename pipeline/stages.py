"""The DVC-tracked stages as functions of ``params.yaml``: one entry point for DVC, Prefect and the CLI.

    python -m pipeline <stage>      # what each dvc.yaml stage runs
    python -m pipeline --list

Paths are relative to the project root (the directory holding ``dvc.yaml``); each stage reads and
writes exactly the deps and outs that ``dvc.yaml`` declares for it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.config import Params
from pipeline.jsonio import write_json

CLEAN_TRAIN = Path("data/clean/train/clean.jsonl")
CLEAN_EVAL = Path("data/clean/eval/clean.jsonl")


def sanitize(p: Params) -> dict:
    from pipeline.sanitize import new_index, sanitize_files

    root = Path(p.sanitize.out_dir)
    train_index = new_index(p.sanitize)
    train = sanitize_files([Path(f) for f in p.data.train], root / "train", p.sanitize,
                           index=train_index, progress=print)
    eval_ = sanitize_files([Path(f) for f in p.data.eval], root / "eval", p.sanitize,
                           reference=train_index, progress=print)
    summary = {"train": train, "eval": eval_}
    write_json(Path("reports/sanitize.json"), summary)
    return summary


def base(p: Params) -> dict:
    from pipeline.base_model import build_base

    out = build_base(p.base, [CLEAN_TRAIN])
    return {"base_dir": str(out), "model": p.base.model}


def augment(p: Params) -> dict:
    from pipeline.augment import augment as run

    return run(CLEAN_TRAIN, p.augment)


def train(p: Params) -> dict:
    from pipeline.train import train as run

    preference = Path(p.data.preference) if p.data.preference else None
    metrics = run(p.train, Path(p.base.out_dir), Path(p.augment.out_dir) / "train.jsonl", CLEAN_EVAL, preference)
    summary = {k: v for k, v in metrics.items() if not k.endswith("_curve")}
    write_json(Path("reports/train.json"), summary)
    return summary


def evaluate(p: Params) -> dict:
    from pipeline.evaluate import evaluate_stage

    return evaluate_stage(Path(p.base.out_dir), Path(p.train.out_dir), CLEAN_EVAL, p.evaluate)


STAGES: dict[str, Callable[[Params], dict]] = {
    "sanitize": sanitize, "base": base, "augment": augment, "train": train, "evaluate": evaluate,
}
