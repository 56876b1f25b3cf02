"""The promotion decision: a pure function of the candidate's, the reference's and the gate's numbers.

The reference is the current champion when one can run on today's base, else the base model; both were
scored on the same held-out examples. The candidate is promoted only if every check passes:

- **improvement**: a seeded paired bootstrap confidence interval of the mean per-example difference on the
  gate's metric (candidate - reference); its lower bound must exceed ``min_improvement``, on at least
  ``min_examples`` paired examples. A metric without per-example values (macro-F1) is paired on the task's
  per-example primary metric, and the reasons say so.
- **validity**: the share of answers the task's parser accepts is at least ``min_valid``.
- **guardrails**: no other named metric drops more than ``guardrail_tolerance``; generation speed stays
  above ``1 - max_slowdown`` of the reference's.
- **forgetting**: next-token accuracy on the generic regression set drops at most ``forgetting_tolerance``
  below the base model's.
- **slices**: when the eval split has a ``curated`` slice (held-out served traffic), each slice's metric
  and paired interval are reported on their own, and the ``original`` slice may not drop by more than
  ``guardrail_tolerance`` (a gain on drifted traffic must not be bought with the old distribution).
- **privacy** (only with ``gate.max_epsilon``): the candidate was trained under ``train.privacy`` and
  its accountant's epsilon is at most the bound.
- **leak**: no canary completed from its prefix, no redacted PII value in any generated answer, and (when
  ``max_exposure`` is set) no canary exposure above it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.config import GateConfig


@dataclass(frozen=True)
class ModelScore:
    name: str  # "base", "champion v3", "candidate"
    metrics: dict[str, float]
    per_example: dict[str, list[float]] = field(default_factory=dict)
    speed: dict[str, float] = field(default_factory=dict)  # {"tokens_per_s": ...} of greedy generation
    forgetting: list[float] | None = None  # per-example next-token accuracy on the generic regression set
    leak: dict | None = None  # the leak probe's result (canary hashes, exposure, completion; PII hits)
    slices: dict[str, dict] = field(default_factory=dict)  # name -> {"range": [start, end), "summary": {...}}
    privacy: dict | None = None  # train.privacy's report (epsilon spent, delta, ...); None: no guarantee

    @classmethod
    def from_details(cls, name: str, details: dict) -> "ModelScore":
        """From one model's entry in the evaluate stage's details.json."""
        forgetting = details.get("forgetting") or {}
        return cls(name, dict(details["summary"]), {k: list(v) for k, v in details["per_example"].items()},
                   dict(details.get("speed") or {}), forgetting.get("per_example"), details.get("leak"),
                   dict(details.get("slices") or {}))


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    confidence: float
    n: int
    samples: int
    seed: int
    paired_on: str

    def to_dict(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in self.__dict__.items()}

    def __str__(self) -> str:
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}] ({self.confidence:.0%} CI, n={self.n})"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reference: str
    reasons: list[str]
    metric: str = ""
    interval: Interval | None = None
    checks: dict[str, bool] = field(default_factory=dict)
    slices: dict[str, dict] = field(default_factory=dict)  # name -> metric of both and the paired interval
    skipped: dict[str, str] = field(default_factory=dict)  # uncomputable guardrails skipped by configuration

    def to_dict(self) -> dict:
        return {"promote": self.promote, "reference": self.reference, "metric": self.metric,
                "interval": self.interval.to_dict() if self.interval else None, "checks": self.checks,
                "reasons": self.reasons, "slices": self.slices, "skipped": self.skipped}


def paired_bootstrap(candidate: list[float], reference: list[float], confidence: float = 0.95,
                     samples: int = 10000, seed: int = 0, paired_on: str = "") -> Interval:
    """Percentile bootstrap interval of the mean of ``candidate - reference`` over resampled examples.

    Percentile rather than BCa: on 0/1 metrics most differences are 0, where BCa's acceleration estimate
    is undefined. Resampled in chunks so memory stays bounded on large eval sets.
    """
    c, r = np.asarray(candidate, dtype=float), np.asarray(reference, dtype=float)
    if c.shape != r.shape:
        raise ValueError(f"paired outcomes differ in length: {len(c)} vs {len(r)}")
    n = len(c)
    if n == 0:
        raise ValueError("no paired examples to bootstrap")
    diff = c - r
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    chunk = max(1, 2_000_000 // n)
    for start in range(0, samples, chunk):
        k = min(chunk, samples - start)
        means[start:start + k] = diff[rng.integers(0, n, size=(k, n))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return Interval(float(diff.mean()), float(low), float(high), confidence, n, samples, seed, paired_on)


def _paired_metric(candidate: ModelScore, reference: ModelScore, metric: str) -> str | None:
    if metric in candidate.per_example and metric in reference.per_example:
        return metric
    return next((k for k in candidate.per_example if k != "valid" and k in reference.per_example), None)


def decide(candidate: ModelScore, reference: ModelScore, gate: GateConfig, metric: str,
           guardrails: list[str] = (), base: ModelScore | None = None) -> Decision:
    """Promote ``candidate`` over ``reference``? ``base`` (default: the reference) anchors forgetting."""
    reasons: list[str] = []
    checks: dict[str, bool] = {}

    def check(name: str, ok: bool, text: str) -> None:
        checks[name] = checks.get(name, True) and ok
        reasons.append(("PASS " if ok else "FAIL ") + text)

    # Improvement, as a paired bootstrap interval.
    paired = _paired_metric(candidate, reference, metric)
    interval = None
    if paired is None:
        check("improvement", False, f"no per-example values to pair {reference.name} and the candidate on")
    else:
        n = len(candidate.per_example[paired])
        if paired != metric:
            reasons.append(f"note: {metric} has no per-example values; the interval pairs {paired}")
        if n != len(reference.per_example[paired]):
            check("improvement", False, f"{reference.name} was scored on {len(reference.per_example[paired])} "
                                        f"examples, the candidate on {n}: not a paired comparison")
        elif n < gate.min_examples:
            check("improvement", False, f"only {n} paired examples < gate.min_examples {gate.min_examples}: "
                                        "too few to tell a gain from noise")
        else:
            interval = paired_bootstrap(candidate.per_example[paired], reference.per_example[paired],
                                        gate.confidence, gate.bootstrap_samples, gate.seed, paired)
            c, r = candidate.metrics.get(metric, float("nan")), reference.metrics.get(metric, float("nan"))
            check("improvement", interval.low > gate.min_improvement,
                  f"{metric} {c:.3f} vs {reference.name} {r:.3f}: difference {interval}; lower bound "
                  f"{'>' if interval.low > gate.min_improvement else '<='} required {gate.min_improvement:+.3f}")

    slices = _slices(candidate, reference, gate, metric, paired, check, reasons) if paired else {}
    if paired is None and len(candidate.slices) > 1:
        reasons.append("note: slices not compared (no paired values: the improvement check fails already)")

    valid = candidate.metrics.get("valid", 0.0)
    check("validity", valid >= gate.min_valid,
          f"valid answers {valid:.3f} {'>=' if valid >= gate.min_valid else '<'} floor {gate.min_valid:.3f}")

    def uncomputable(kind: str, check_name: str, text: str) -> None:
        """A guardrail that cannot be computed fails, unless configuration says to skip it: never silent."""
        if kind in gate.skip_uncomputable:
            reasons.append(f"SKIP {text} (gate.skip_uncomputable: {kind})")
            skipped[kind] = text
        else:
            check(check_name, False, f"{text}: cannot be checked (list '{kind}' in gate.skip_uncomputable to "
                                     "promote without it)")

    skipped: dict[str, str] = {}
    for m in guardrails:
        missing = [who for who, score in (("the candidate", candidate), (reference.name, reference))
                   if m not in score.metrics]
        if missing:
            uncomputable("guardrail_metrics", "guardrails", f"guardrail {m}: not measured for {' and '.join(missing)}")
            continue
        drop = reference.metrics[m] - candidate.metrics[m]
        check("guardrails", drop <= gate.guardrail_tolerance,
              f"guardrail {m}: {candidate.metrics[m]:.3f} vs {reference.name} {reference.metrics[m]:.3f} "
              f"(drop {drop:+.3f}, tolerance {gate.guardrail_tolerance:.3f})")
    c_speed, r_speed = candidate.speed.get("tokens_per_s"), reference.speed.get("tokens_per_s")
    if not c_speed or not r_speed:  # None, or 0 tokens/s: no ratio to judge (0 used to pass unchecked)
        uncomputable("speed", "guardrails", f"generation speed: candidate {c_speed!r}, {reference.name} "
                                            f"{r_speed!r} tokens/s")
    else:
        floor = (1 - gate.max_slowdown) * r_speed
        check("guardrails", c_speed >= floor,
              f"generation speed {c_speed:.1f} tokens/s vs {reference.name} {r_speed:.1f} "
              f"(floor {floor:.1f} = {1 - gate.max_slowdown:.2f}x)")

    anchor = base or reference
    if candidate.forgetting is None and anchor.forgetting is None:
        reasons.append("note: forgetting not measured (no generic regression set: data.forgetting)")
    elif not candidate.forgetting or not anchor.forgetting:
        uncomputable("forgetting", "forgetting", f"forgetting: the generic regression set was scored for "
                     f"{'the candidate' if candidate.forgetting else anchor.name} only")
    else:
        c_f, b_f = float(np.mean(candidate.forgetting)), float(np.mean(anchor.forgetting))
        drop = b_f - c_f
        check("forgetting", drop <= gate.forgetting_tolerance,
              f"generic regression set next-token accuracy {c_f:.3f} vs {anchor.name} {b_f:.3f} "
              f"(drop {drop:+.3f}, tolerance {gate.forgetting_tolerance:.3f}, n={len(candidate.forgetting)})")

    leak = candidate.leak
    if leak is None:
        reasons.append("note: leak probe not run (probes off)")
    else:
        canaries = leak.get("canaries", [])
        completed = [c for c in canaries if c.get("completed")]
        worst = max((c.get("exposure", 0.0) for c in canaries), default=0.0)
        check("leak", not completed, f"canaries completed from their prefix: {len(completed)} of {len(canaries)}")
        if gate.max_exposure and canaries:
            exposed = [c for c in canaries if c.get("exposure", 0.0) > gate.max_exposure]
            check("leak", not exposed, f"canary exposure max {worst:.2f} bits (threshold {gate.max_exposure:.2f}; "
                                       f"{len(exposed)} above)")
        elif canaries:
            reasons.append(f"note: canary exposure max {worst:.2f} bits (not gated: gate.max_exposure is 0)")
        if "pii_hits" not in leak:
            uncomputable("leak", "leak", "redacted PII values in generated answers: not scanned")
        else:
            hits = leak["pii_hits"]
            check("leak", hits == 0, f"redacted PII values in {leak.get('answers_scanned', 0)} generated answers: {hits}")

    if gate.max_epsilon is not None:
        eps = (candidate.privacy or {}).get("epsilon")
        check("privacy", eps is not None and eps <= gate.max_epsilon,
              f"differential privacy: epsilon {eps:.3f} {'<=' if eps <= gate.max_epsilon else '>'} bound "
              f"{gate.max_epsilon:.3f}" if eps is not None else
              f"differential privacy: the candidate has no finite epsilon (trained without train.privacy or "
              f"without noise); gate.max_epsilon {gate.max_epsilon:.3f} requires one")

    return Decision(promote=all(checks.values()) and bool(checks), reference=reference.name, reasons=reasons,
                    metric=metric, interval=interval, checks=checks, slices=slices, skipped=skipped)


def uncomputable_slice(gate: GateConfig, check, reasons: list[str], name: str, why: str) -> None:
    text = f"slice {name}: {why}"
    if "slices" in gate.skip_uncomputable:
        reasons.append(f"SKIP {text} (gate.skip_uncomputable: slices)")
    else:
        check("slices", False, f"{text}: cannot be compared (list 'slices' in gate.skip_uncomputable to "
                               "promote without it)")


def _slices(candidate: ModelScore, reference: ModelScore, gate: GateConfig, metric: str, paired: str,
            check, reasons: list[str]) -> dict[str, dict]:
    """Each eval slice on its own (only when there is more than one): metric of both, paired interval; the
    original slice is a guardrail."""
    if len(candidate.slices) < 2 and len(reference.slices) < 2:
        return {}
    out: dict[str, dict] = {}
    for name in sorted(set(reference.slices) - set(candidate.slices)):
        uncomputable_slice(gate, check, reasons, name, f"scored for {reference.name} only")
    for name, cs in candidate.slices.items():
        rs = reference.slices.get(name)
        a, b = cs["range"]
        if rs is None or rs["range"] != cs["range"] or b <= a:
            uncomputable_slice(gate, check, reasons, name, f"not scored the same way for {reference.name} and "
                                                           "the candidate")
            continue
        c_val, r_val = cs["summary"].get(metric), rs["summary"].get(metric)
        iv = paired_bootstrap(candidate.per_example[paired][a:b], reference.per_example[paired][a:b],
                              gate.confidence, gate.bootstrap_samples, gate.seed, paired)
        out[name] = {"n": b - a, "candidate": c_val, "reference": r_val, "interval": iv.to_dict()}
        text = (f"slice {name}: {metric} {c_val if c_val is not None else float('nan'):.3f} vs {reference.name} "
                f"{r_val if r_val is not None else float('nan'):.3f}, difference {iv}")
        if name == "original":
            check("slices", iv.mean >= -gate.guardrail_tolerance,
                  f"{text}; may drop at most {gate.guardrail_tolerance:.3f}")
        else:
            reasons.append("note: " + text)
    return out
