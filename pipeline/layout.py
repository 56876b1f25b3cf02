"""Where each stage's files live: the one place that names them, for the stages and for their readers.

Folders come from the ``<stage>.out_dir`` parameters, which dvc.yaml interpolates (``${sanitize.out_dir}``),
so params and DVC outs are one source; the file names inside each folder are fixed here.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Params

TASK_FILE = Path("artifacts/task.json")  # the task stage's hashes of the files the task reads
PII_DIGESTS = "pii_digests.txt"  # keyed digests of the values sanitize redacted, never the values
SPLITS_WITH_DIGESTS = ("train", "eval", "generic", "preference", "curated", "curated_eval")
# The curate stage's data version: records built from served traffic and feedback (pipeline/curate/).
CURATED_FILES = ("train.jsonl", "eval.jsonl", "preference.jsonl")
CURATE_STATE = "cuts.json"  # what each cut added (in the data version)
CURSOR_FILE = "curate_cursor.json"  # beside the request log: how far curate consumed the logs
CURATED_TAG = "curated_records"  # version tag: curated records (train + eval slice) in the data it was trained on
CURATE_REPORT = Path("reports/curate.json")  # the last run's reconciliation and what waits for training


def clean_split(p: Params, split: str) -> Path:
    """``train``, ``eval``, ``preference``, ``generic``, ``forgetting``, ``curated`` (curated training records)
    or ``curated_eval`` (the held-out curated slice): the sanitized records of that input."""
    return Path(p.sanitize.out_dir) / split / "clean.jsonl"


def validation_file(p: Params) -> Path:
    return Path(p.sanitize.out_dir) / "train" / "validation.jsonl"


def augmented_file(p: Params) -> Path:
    return Path(p.augment.out_dir) / "train.jsonl"


def pii_digest_files(p: Params) -> list[Path]:
    return [Path(p.sanitize.out_dir) / split / PII_DIGESTS for split in SPLITS_WITH_DIGESTS]


def base_inputs_file(p: Params) -> Path:
    """What the base is built from (the ``base_inputs`` stage): hashes of the sanitized text for the
    embedded base, nothing for a pretrained one, so only the embedded base re-runs on new data."""
    return Path(p.base.inputs_file)


def feedback_log(p: Params) -> Path:
    """The gateway's feedback log: next to the request log, rotated the same way."""
    return Path(p.serve.traffic_log).with_name("feedback.jsonl")


def serving_log(p: Params) -> Path:
    """What the endpoint served when: one line per version served, rejected or stopped (the dossier's
    serving periods), next to the request log."""
    return Path(p.serve.traffic_log).with_name("serving.jsonl")


def curated_file(p: Params, name: str) -> Path:
    """``train``, ``eval`` or ``preference``: the curate stage's records of that kind (before sanitize)."""
    return Path(p.curate.out_dir) / f"{name}.jsonl"


def curated_count(p: Params) -> int:
    """Curated records in the data version (training side + eval slice): what a drift-triggered retrain
    counts as new against the latest version's ``curated_records`` tag."""
    from pipeline.io import count_lines

    return count_lines(curated_file(p, "train")) + count_lines(curated_file(p, "eval"))
