"""The promotion decision: a pure function of the candidate's, the reference's and the gate's numbers.

The reference is the current champion when one exists, else the base model. The candidate must clear
an absolute JSON-validity floor and beat the reference's metric by ``min_improvement``; against a
champion the win must also be significant under an exact McNemar test on the paired per-example
outcomes (same eval examples), so noise never moves the alias.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import comb

from pipeline.config import GateConfig


@dataclass(frozen=True)
class ModelScore:
    name: str  # "base", "champion v3", ...
    metrics: dict[str, float]
    per_example_exact: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Decision:
    promote: bool
    reference: str
    reasons: list[str]
    p_value: float | None = None

    def to_dict(self) -> dict:
        return {"promote": self.promote, "reference": self.reference, "reasons": self.reasons,
                "p_value": self.p_value}


def mcnemar_exact(candidate: list[int], reference: list[int]) -> float:
    """One-sided exact McNemar p-value that the candidate is right more often than the reference."""
    if len(candidate) != len(reference):
        raise ValueError(f"paired outcomes differ in length: {len(candidate)} vs {len(reference)}")
    wins = sum(1 for c, r in zip(candidate, reference) if c and not r)
    losses = sum(1 for c, r in zip(candidate, reference) if r and not c)
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(comb(n, k) for k in range(wins, n + 1)) / 2**n


def decide(candidate: ModelScore, reference: ModelScore, gate: GateConfig, reference_is_champion: bool) -> Decision:
    reasons: list[str] = []
    ok = True
    valid = candidate.metrics.get("json_valid", 0.0)
    if valid < gate.min_json_valid:
        ok = False
        reasons.append(f"json_valid {valid:.3f} < floor {gate.min_json_valid:.3f}")
    else:
        reasons.append(f"json_valid {valid:.3f} >= floor {gate.min_json_valid:.3f}")
    c, r = candidate.metrics[gate.metric], reference.metrics[gate.metric]
    delta = c - r
    if delta < gate.min_improvement:
        ok = False
        reasons.append(f"{gate.metric} {c:.3f} vs {reference.name} {r:.3f}: +{delta:.3f} < required +{gate.min_improvement:.3f}")
    else:
        reasons.append(f"{gate.metric} {c:.3f} vs {reference.name} {r:.3f}: +{delta:.3f} >= required +{gate.min_improvement:.3f}")
    p = None
    if reference_is_champion:
        p = mcnemar_exact(candidate.per_example_exact, reference.per_example_exact)
        if p >= gate.significance:
            ok = False
            reasons.append(f"not significant against the champion: McNemar p={p:.4f} >= {gate.significance}")
        else:
            reasons.append(f"significant against the champion: McNemar p={p:.4f} < {gate.significance}")
    return Decision(promote=ok, reference=reference.name, reasons=reasons, p_value=p)
