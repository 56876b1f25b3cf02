"""What every answer kind provides: check a reference, score a prediction (values and a reason), aggregate.

Scorers follow the Inspect AI shape: one ``Score`` per example with every metric's value and, when the
prediction could not be used, the reason; summaries are means of per-example values, so any statistic
(a bootstrap interval, a paired test) can be computed later from the per-example vectors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pipeline.config import TaskConfig

_FENCE = re.compile(r"^```[\w+-]*\s*\n(.*?)\n?```\s*$", re.S)


@dataclass
class Score:
    values: dict[str, float]
    reason: str = ""  # empty when the prediction parsed; else why it scored 0
    parsed: object = field(default=None, repr=False)  # the parsed answer (labels for macro-F1)


# task: settings that belong to one answer kind or another; a kind lists the ones it reads in ``settings``.
KIND_SETTINGS = ("json_schema", "fields", "labels", "database", "scorer", "metrics")


class Task:
    """One answer kind, everything about it in one class: what it is called, the metrics it scores per
    example and in aggregate, the one the gate tests by default, the settings and files it reads, and how
    it checks a reference and scores a prediction. Subclasses are registered with ``@register``
    (pipeline/tasks/__init__.py) and found by ``task.kind``."""

    kind: ClassVar[str] = ""
    metrics_per_example: ClassVar[tuple[str, ...]] = ("valid",)  # ``valid``: the task's parser accepted it
    aggregate_metrics: ClassVar[tuple[str, ...]] = ()  # computed over the whole split, not per example
    primary: ClassVar[str] = "valid"  # the gate's metric when gate.metric is empty
    settings: ClassVar[frozenset[str]] = frozenset()  # which of KIND_SETTINGS this kind reads

    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg
        self.metrics = self.metric_names(cfg)

    def __reduce__(self):
        # Sent to sanitize's Dask workers: rebuilt there from its config (a compiled JSON Schema validator
        # or a database handle does not pickle, and the worker must check the same resources anyway).
        return _rebuild, (type(self), self.cfg)

    @classmethod
    def check_config(cls, cfg: TaskConfig) -> None:
        """Raise ValueError (naming the ``task.<key>``) when ``cfg`` lacks what this kind needs."""

    @classmethod
    def metric_names(cls, cfg: TaskConfig) -> tuple[str, ...]:
        return cls.metrics_per_example

    @classmethod
    def primary_metric(cls, cfg: TaskConfig) -> str:
        return cls.primary

    @classmethod
    def resources(cls, cfg: TaskConfig) -> list[Path]:
        """Files this task reads besides params.yaml (a schema, a database, a scorer module): the stages
        that score answers depend on them (the ``task`` stage hashes them)."""
        return []

    def check_reference(self, answer: str) -> str | None:
        """Why a reference answer does not fit the task (a data defect), or None."""
        return None

    def answer_key(self, answer: str) -> str:
        """The answer's meaning as a string: two answers with the same key are the same answer (sanitize's
        duplicates and label conflicts). By default, the text up to case and whitespace."""
        from pipeline.dedup import text_key

        return text_key(answer)

    def score(self, prediction: str, reference: str, prompt: str = "") -> Score:
        raise NotImplementedError

    def zero(self, reason: str) -> Score:
        return Score({m: 0.0 for m in self.metrics}, reason)

    def aggregate(self, scores: list[Score], references: list[str]) -> dict[str, float]:
        n = max(len(scores), 1)
        return {m: round(sum(s.values[m] for s in scores) / n, 4) for m in self.metrics}

    def drift_columns(self, answer: str) -> dict[str, str]:
        """Categorical values of one answer that drift monitoring compares with the training answers."""
        return {}

    def is_valid(self, answer: str) -> bool:
        """Whether the task's parser accepts ``answer`` (drift monitoring's validity rate)."""
        return self.check_reference(answer) is None


def strip_fence(text: str) -> str:
    """An answer wrapped in a Markdown code fence, unwrapped (models often add one)."""
    m = _FENCE.match(text.strip())
    return m.group(1).strip() if m else text.strip()


def _rebuild(cls: type[Task], cfg: TaskConfig) -> Task:
    return cls(cfg)
