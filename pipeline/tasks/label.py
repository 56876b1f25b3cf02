"""Answers from a closed label set: accuracy per example, macro-F1 over the set."""

from __future__ import annotations

from pipeline.tasks import register
from pipeline.tasks.base import Score, Task
from pipeline.tasks.text import normalise


@register
class LabelTask(Task):
    kind = "label"
    metrics_per_example = ("valid", "accuracy")
    aggregate_metrics = ("macro_f1",)
    primary = "accuracy"
    settings = frozenset({"labels"})

    @classmethod
    def check_config(cls, cfg) -> None:
        if len(set(cfg.labels)) < 2:
            raise ValueError("task.labels: kind label needs at least two distinct labels")

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._labels = {normalise(label): label for label in cfg.labels}

    def parse(self, answer: str) -> str | None:
        return self._labels.get(normalise(answer))

    def check_reference(self, answer: str) -> str | None:
        if self.parse(answer) is None:
            return f"label {answer.strip()[:80]!r} is not one of {sorted(self.cfg.labels)}"
        return None

    def answer_key(self, answer: str) -> str:
        return self.parse(answer) or super().answer_key(answer)

    def score(self, prediction: str, reference: str, prompt: str = "") -> Score:
        pred = self.parse(prediction)
        if pred is None:
            return self.zero(f"{prediction.strip()[:80]!r} is not one of the task's labels")
        return Score({"valid": 1.0, "accuracy": float(pred == self.parse(reference))}, "", pred)

    def drift_columns(self, answer: str) -> dict[str, str]:
        return {"label": self.parse(answer) or "<invalid>"}

    def aggregate(self, scores: list[Score], references: list[str]) -> dict[str, float]:
        out = super().aggregate(scores, references)
        out["macro_f1"] = round(macro_f1([s.parsed for s in scores], [self.parse(r) for r in references]), 4)
        return out


def macro_f1(predicted: list[str | None], actual: list[str | None]) -> float:
    """Mean F1 over the labels that occur in the references or the predictions (None: unparsable)."""
    labels = {x for x in (*predicted, *actual) if x is not None}
    if not labels:
        return 0.0
    total = 0.0
    for label in labels:
        tp = sum(1 for p, a in zip(predicted, actual) if p == label and a == label)
        fp = sum(1 for p, a in zip(predicted, actual) if p == label and a != label)
        fn = sum(1 for p, a in zip(predicted, actual) if p != label and a == label)
        total += 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return total / len(labels)
