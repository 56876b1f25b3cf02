"""A user's own scorer: ``task.scorer: "module:function"`` returning per-example scores.

The function is called as ``fn(prediction, reference, prompt)`` and returns a mapping of metric name to a
number in [0, 1] for each name in ``task.metrics`` (an optional ``"reason"`` string and ``"valid"`` may be
included), or a single number for a task with one metric. A scorer that raises or returns something else
scores the example 0 with the reason; it never stops the evaluation.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path

from pipeline.config import ConfigError, TaskConfig
from pipeline.tasks import register
from pipeline.tasks.base import Score, Task


def load_scorer(spec: str):
    module_name, _, attr = spec.partition(":")
    if str(Path.cwd()) not in sys.path:  # a scorer module kept in the project root
        sys.path.insert(0, str(Path.cwd()))
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"task.scorer: cannot load {spec!r}: {err}") from None
    if not callable(fn):
        raise ConfigError(f"task.scorer: {spec!r} is not callable")
    return fn


def scorer_file(spec: str) -> Path | None:
    """The source file of the scorer's module (without running it), when it is a file of its own."""
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        found = importlib.util.find_spec(spec.partition(":")[0])
    except (ImportError, ValueError):
        return None
    return Path(found.origin) if found and found.origin and found.origin.endswith(".py") else None


@register
class CustomTask(Task):
    kind = "custom"
    settings = frozenset({"scorer", "metrics"})

    @classmethod
    def check_config(cls, cfg: TaskConfig) -> None:
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", cfg.scorer):
            raise ValueError(f"task.scorer: kind custom needs 'module:function' (got {cfg.scorer!r})")
        if not cfg.metrics:
            raise ValueError("task.metrics: kind custom needs the metric names the scorer returns")

    @classmethod
    def metric_names(cls, cfg: TaskConfig) -> tuple[str, ...]:
        return ("valid", *(m for m in cfg.metrics if m != "valid"))

    @classmethod
    def primary_metric(cls, cfg: TaskConfig) -> str:
        return (cfg.metrics or ["valid"])[0]

    @classmethod
    def resources(cls, cfg: TaskConfig) -> list[Path]:
        found = scorer_file(cfg.scorer)
        return [found] if found else []

    def __init__(self, cfg: TaskConfig) -> None:
        super().__init__(cfg)
        self.fn = load_scorer(cfg.scorer)

    def check_reference(self, answer: str) -> str | None:
        return None if answer.strip() else "empty answer"

    def is_valid(self, answer: str) -> bool:
        return bool(answer.strip())

    def score(self, prediction: str, reference: str, prompt: str = "") -> Score:
        try:
            out = self.fn(prediction, reference, prompt)
        except Exception as err:  # a user's scorer: any failure is that example's reason, not a crash
            return self.zero(f"scorer {self.cfg.scorer} raised {type(err).__name__}: {err}")
        if isinstance(out, (int, float)) and not isinstance(out, bool):
            out = {self.cfg.metrics[0]: out}
        if not isinstance(out, dict):
            return self.zero(f"scorer returned {type(out).__name__}, expected a mapping of metric to number")
        missing = [m for m in self.metrics if m != "valid" and m not in out]
        if missing:
            return self.zero(f"scorer result lacks {missing}")
        try:
            values = {m: float(out.get(m, 1.0)) for m in self.metrics}
        except (TypeError, ValueError) as err:
            return self.zero(f"scorer returned a non-number: {err}")
        return Score(values, str(out.get("reason", "")), prediction)
