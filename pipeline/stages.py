"""The DVC-tracked stages as functions of ``params.yaml``: one entry point for DVC, Prefect and the CLI.

    python -m pipeline <stage>      # what each dvc.yaml stage runs
    python -m pipeline --list

This is the composition root: the one module (with ``flows/``) that imports several stages and passes one
stage's results to another (docs/architecture.md, "Import rules"). Paths are relative to the project root;
where each file lives is ``pipeline/layout.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.config import ConfigError, Params
from pipeline.io import write_json
from pipeline.layout import (CURATE_REPORT, CURATED_FILES, PII_DIGESTS, TASK_FILE, augmented_file, base_inputs_file, clean_split,
                             curated_file, feedback_log, pii_digest_files, validation_file)


def task(p: Params) -> dict:
    """The files the task reads (a schema, a database, a scorer module), hashed, so the stages that check
    or score answers re-run when one of them changes (dvc.yaml runs this stage every time)."""
    from pipeline.hashing import file_sha256

    files = p.task.kind_class.resources(p.task)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"params.yaml: task: {', '.join(missing)}: file not found (named in the task: section)")
    summary = {"kind": p.task.kind, "files": {str(f): file_sha256(f) for f in files}}
    write_json(TASK_FILE, summary)
    return summary


def curate(p: Params) -> dict:
    """Served traffic and feedback since the last cut -> curated records (appended: a new data version)."""
    from pipeline.curate import curate as run
    from pipeline.tasks import build_task

    out = Path(p.curate.out_dir)
    if not p.curate.enabled:
        out.mkdir(parents=True, exist_ok=True)
        for name in CURATED_FILES:
            (out / name).touch()
        result = {"enabled": False}
        write_json(CURATE_REPORT, result)
        return result
    teacher = None
    if p.curate.teacher is not None:
        from pipeline.curate.teacher import Teacher

        teacher = Teacher(p.curate.teacher, p.task)
    try:
        task = build_task(p.task)
        result = run(p.curate, p.task, task, Path(p.serve.traffic_log), feedback_log(p), out,
                     model=p.project.name, teacher=teacher, trainable=curated_record_check(p, task))
    finally:
        if teacher is not None:
            teacher.close()
    write_json(CURATE_REPORT, result)
    return result


def curated_record_check(p: Params, task) -> Callable[[list[dict]], str | None]:
    """What a curated record must pass to be written: sanitize's record checks (blank or control characters,
    size, shape) and the task's answer check, so ``curate.min_new_records`` counts records training gets."""
    from pipeline.data.records import RecordError, to_messages

    def check(messages: list[dict]) -> str | None:
        try:
            msgs = to_messages({"messages": messages}, p.sanitize.max_chars, p.sanitize.max_depth)
        except RecordError as err:
            return err.reason
        return "invalid_answer" if task.check_reference(msgs[-1]["content"]) else None

    return check


def sanitize(p: Params) -> dict:
    from pipeline.data.engine import open_engine
    from pipeline.tasks import build_task

    for key in ("train", "eval"):
        if not getattr(p.data, key):
            raise ConfigError(f"params.yaml: data.{key}: no input files listed")
    root = Path(p.sanitize.out_dir)
    task = build_task(p.task)
    with open_engine(p.sanitize) as engine:  # one cluster for every split
        return _sanitize_splits(p, root, task, engine)


def _sanitize_splits(p: Params, root: Path, task, engine) -> dict:
    from pipeline.data.sanitize import new_index, sanitize_files

    train_index = new_index(p.sanitize)
    summary = {"train": sanitize_files([Path(f) for f in p.data.train], root / "train", p.sanitize, task=task,
                                       index=train_index, validation_fraction=p.data.validation_fraction,
                                       progress=print, engine=engine)}
    eval_index = new_index(p.sanitize)
    summary["eval"] = sanitize_files([Path(f) for f in p.data.eval], root / "eval", p.sanitize, task=task,
                                     reference=train_index, index=eval_index, progress=print, engine=engine)
    # Records curated from served traffic: training ones deduplicated against train (a conflicting answer
    # is quarantined) and checked against eval (contamination); the held-out slice against both.
    for split, kind, index, reference in (("curated", "train", train_index, eval_index),
                                          ("curated_eval", "eval", eval_index, train_index)):
        source = _nonempty(curated_file(p, kind))
        if source is None:
            _empty(clean_split(p, split))
            continue
        summary[split] = sanitize_files([source], root / split, p.sanitize, task=task, index=index,
                                        reference=reference, progress=print, require_records=False,
                                        engine=engine)
    # Preference pairs and generic chat data reach training too, so they pass the same checks (generic
    # answers are not the task's, so only their form is checked).
    # An input that is not configured still gets its (empty) file: dvc.yaml declares them for train.
    curated_pairs = _nonempty(curated_file(p, "preference"))
    if (p.data.preference or curated_pairs) and p.train.method == "dpo":
        pairs = [Path(p.data.preference)] if p.data.preference else []
        summary["preference"] = sanitize_files(pairs + ([curated_pairs] if curated_pairs else []),
                                               root / "preference", p.sanitize, task=task, shape="preference",
                                               progress=print, engine=engine)
    else:  # an input nothing reads is not checked: it cannot fail a run that does not use it
        if p.data.preference:
            print(f"sanitize: data.preference ({p.data.preference}) skipped: train.method {p.train.method} "
                  "does not use it")
        _empty(clean_split(p, "preference"))
    generic_index = new_index(p.sanitize)
    if p.data.generic:
        summary["generic"] = sanitize_files([Path(p.data.generic)], root / "generic", p.sanitize,
                                            index=generic_index, progress=print, engine=engine)
    else:
        _empty(clean_split(p, "generic"))
    # The forgetting set must be held out from the generic training mix, as eval is from train.
    if p.data.forgetting:
        summary["forgetting"] = sanitize_files([Path(p.data.forgetting)], root / "forgetting", p.sanitize,
                                               reference=generic_index, progress=print, engine=engine)
    else:
        _empty(clean_split(p, "forgetting"))
    write_json(Path("reports/sanitize.json"), summary)
    return summary


def _empty(path: Path) -> None:
    """An input that is not configured: empty clean and digest files (dvc.yaml declares them as deps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("", encoding="utf-8")
    (path.parent / PII_DIGESTS).write_text("", encoding="utf-8")


def _nonempty(path: Path) -> Path | None:
    return path if path.is_file() and path.stat().st_size else None


def base_inputs(p: Params) -> dict:
    from pipeline.base import write_inputs

    return write_inputs(p.base, [clean_split(p, "train")], [clean_split(p, "generic")], base_inputs_file(p))


def base(p: Params) -> dict:
    from pipeline.base import build_base

    out = build_base(p.base, base_inputs_file(p))
    return {"base_dir": str(out), "model": p.base.model}


def augment(p: Params) -> dict:
    from pipeline.augment.synthesize import augment as run

    from pipeline.pii import build_redactor

    return run(clean_split(p, "train"), p.augment, p.task, build_redactor(p.sanitize),
               curated_file=_nonempty(clean_split(p, "curated")))


def train(p: Params) -> dict:
    from pipeline.canaries import make_canaries
    from pipeline.train.trainer import train as run

    canaries = [c for c in make_canaries(p.probes) for _ in range(p.probes.repetitions)]
    metrics = run(p.train, Path(p.base.out_dir), augmented_file(p), _nonempty(validation_file(p)),
                  preference_file=_nonempty(clean_split(p, "preference")),
                  generic_file=_nonempty(clean_split(p, "generic")), canaries=canaries,
                  init_adapter=champion_adapter(p) if p.train.continual.from_champion else None)
    if not metrics:  # a rank other than 0 under torchrun/accelerate: rank 0 writes every output
        return {}
    summary = {k: v for k, v in metrics.items() if not k.endswith("_curve")}
    write_json(Path("reports/train.json"), summary)
    return summary


def champion_adapter(p: Params) -> Path | None:
    """The champion's adapter to continue from (``train.continual.from_champion``): None when there is no
    champion yet or it was trained on another base (its weights mean nothing on this one); both said.
    A registry or artifact store that does not answer raises (the flow retries): a run never falls back
    to training from scratch because a read failed."""
    from pipeline import registry
    from pipeline.modeling import base_weights_sha256

    champion = registry.get_alias(p.registry, p.project.name)
    if champion is None:
        print(f"train: {p.project.name} has no @{p.registry.alias} yet: training from scratch")
        return None
    if champion.tags.get("base_weights_sha256") != base_weights_sha256(Path(p.base.out_dir)):
        print(f"train: champion v{champion.version} was trained on another base: training from scratch")
        return None
    return registry.download_adapter(p.registry, champion, Path(p.serve.adapters_dir))


def evaluate(p: Params) -> dict:
    from pipeline.evaluate.scoring import evaluate_stage
    from pipeline.pii import build_redactor

    return evaluate_stage(Path(p.base.out_dir), Path(p.train.out_dir), eval_slices(p), p.evaluate, p.task,
                          forgetting_file=_nonempty(clean_split(p, "forgetting")), probes=p.probes,
                          pii_digest_files=pii_digest_files(p),
                          redactor=build_redactor(p.sanitize), serve=p.serve)


def eval_slices(p: Params) -> dict[str, Path]:
    """What the gate scores: the held-out split, and the held-out slice of curated traffic when there is one
    (so after drift candidates are judged on the drifted requests too, each slice reported on its own)."""
    slices = {"original": clean_split(p, "eval")}
    curated = _nonempty(clean_split(p, "curated_eval"))
    if curated is not None:
        slices["curated"] = curated
    return slices


def rescorer(p: Params) -> Callable[[Path, Path], dict]:
    """How the release re-scores the champion's adapter, on the base it was trained on, over today's eval
    split (the evaluate stage's code)."""
    from pipeline.evaluate.scoring import evaluate_model

    def rescore(adapter_dir: Path, base_dir: Path) -> dict:
        return evaluate_model(base_dir, adapter_dir, eval_slices(p), p.evaluate, p.task, serve=p.serve)

    return rescore


STAGES: dict[str, Callable[[Params], dict]] = {
    "task": task, "curate": curate, "sanitize": sanitize, "base_inputs": base_inputs, "base": base, "augment": augment, "train": train,
    "evaluate": evaluate,
}
