"""The promotion decision: a pure function of the candidate's, the reference's and the gate's numbers.

The reference is the current champion when one exists, else the base model. The candidate must clear
the task's validity floor (share of answers its parser accepts) and beat the reference on the gate's
metric by ``min_improvement``; against a champion the win must also be significant under an exact
one-sided sign test on the paired per-example values (same eval examples): for 0/1 metrics that is
McNemar's exact test on the discordant pairs. Noise never moves the alias.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import comb

from pipeline.config import GateConfig


@dataclass(frozen=True)
class ModelScore:
    name: str  # "base", "champion v3", ...
    metrics: dict[str, float]
    per_example: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def from_details(cls, name: str, details: dict) -> "ModelScore":
        """From one model's entry in the evaluate stage's details.json."""
        return cls(name, dict(details["summary"]), {k: list(v) for k, v in details["per_example"].items()})


@dataclass(frozen=True)
class Decision:
    promote: bool
    reference: str
    reasons: list[str]
    metric: str = ""
    p_value: float | None = None

    def to_dict(self) -> dict:
        return {"promote": self.promote, "reference": self.reference, "metric": self.metric,
                "reasons": self.reasons, "p_value": self.p_value}


def sign_test(candidate: list[float], reference: list[float]) -> float:
    """One-sided exact sign test p-value that the candidate scores higher than the reference per example.

    Ties carry no information and are dropped; on 0/1 values this is McNemar's exact test.
    """
    if len(candidate) != len(reference):
        raise ValueError(f"paired outcomes differ in length: {len(candidate)} vs {len(reference)}")
    wins = sum(1 for c, r in zip(candidate, reference) if c > r)
    losses = sum(1 for c, r in zip(candidate, reference) if c < r)
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(comb(n, k) for k in range(wins, n + 1)) / 2**n


def decide(candidate: ModelScore, reference: ModelScore, gate: GateConfig, reference_is_champion: bool,
           metric: str) -> Decision:
    reasons: list[str] = []
    ok = True
    valid = candidate.metrics.get("valid", 0.0)
    if valid < gate.min_valid:
        ok = False
        reasons.append(f"valid answers {valid:.3f} < floor {gate.min_valid:.3f}")
    else:
        reasons.append(f"valid answers {valid:.3f} >= floor {gate.min_valid:.3f}")
    c, r = candidate.metrics[metric], reference.metrics[metric]
    delta = c - r
    if delta < gate.min_improvement:
        ok = False
        reasons.append(f"{metric} {c:.3f} vs {reference.name} {r:.3f}: {delta:+.3f} < required +{gate.min_improvement:.3f}")
    else:
        reasons.append(f"{metric} {c:.3f} vs {reference.name} {r:.3f}: {delta:+.3f} >= required +{gate.min_improvement:.3f}")
    p = None
    if reference_is_champion:
        if metric in candidate.per_example and metric in reference.per_example:
            p = sign_test(candidate.per_example[metric], reference.per_example[metric])
        else:  # macro-F1 has no per-example value: pair on the task's per-example metric (accuracy)
            key = next(k for k in candidate.per_example if k != "valid")
            p = sign_test(candidate.per_example[key], reference.per_example[key])
        if p >= gate.significance:
            ok = False
            reasons.append(f"not significant against the champion: sign test p={p:.4f} >= {gate.significance}")
        else:
            reasons.append(f"significant against the champion: sign test p={p:.4f} < {gate.significance}")
    return Decision(promote=ok, reference=reference.name, reasons=reasons, metric=metric, p_value=p)
