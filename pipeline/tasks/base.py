"""What every answer kind provides: check a reference, score a prediction (values and a reason), aggregate.

Scorers follow the Inspect AI shape: one ``Score`` per example with every metric's value and, when the
prediction could not be used, the reason; summaries are means of per-example values, so any statistic
(a bootstrap interval, a paired test) can be computed later from the per-example vectors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pipeline.config import TaskConfig

_FENCE = re.compile(r"^```[\w+-]*\s*\n(.*?)\n?```\s*$", re.S)


@dataclass
class Score:
    values: dict[str, float]
    reason: str = ""  # empty when the prediction parsed; else why it scored 0
    parsed: object = field(default=None, repr=False)  # the parsed answer (labels for macro-F1)


class Task:
    """One answer kind. Subclasses set ``kind`` and implement ``check_reference`` and ``score``."""

    kind = ""

    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg
        self.metrics = cfg.metric_names

    def check_reference(self, answer: str) -> str | None:
        """Why a reference answer does not fit the task (a data defect), or None."""
        return None

    def score(self, prediction: str, reference: str, prompt: str = "") -> Score:
        raise NotImplementedError

    def zero(self, reason: str) -> Score:
        return Score({m: 0.0 for m in self.metrics}, reason)

    def aggregate(self, scores: list[Score], references: list[str]) -> dict[str, float]:
        n = max(len(scores), 1)
        return {m: round(sum(s.values[m] for s in scores) / n, 4) for m in self.metrics}

    def is_valid(self, answer: str) -> bool:
        """Whether the task's parser accepts ``answer`` (drift monitoring's validity rate)."""
        return self.check_reference(answer) is None


def strip_fence(text: str) -> str:
    """An answer wrapped in a Markdown code fence, unwrapped (models often add one)."""
    m = _FENCE.match(text.strip())
    return m.group(1).strip() if m else text.strip()
