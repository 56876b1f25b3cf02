import numpy as np
import pytest

from pipeline.config import GateConfig
from pipeline.release.gate import ModelScore, decide, paired_bootstrap

GATE = GateConfig(bootstrap_samples=2000)


def ms(name, per, valid=1.0, **extra):
    em = float(np.mean(per)) if per else 0.0
    extra.setdefault("speed", {"tokens_per_s": 100.0})  # every real score has it (the evaluate stage times both)
    return ModelScore(name, {"exact_match": em, "valid": valid, **extra.pop("metrics", {})},
                      {"exact_match": list(per), "valid": [1.0] * len(per)}, **extra)


def test_clear_win_on_enough_examples_promotes_with_the_interval():
    d = decide(ms("candidate", [1] * 90 + [0] * 10), ms("base", [0] * 100), GATE, "exact_match")
    assert d.promote and d.reference == "base" and d.metric == "exact_match"
    assert d.interval.n == 100 and 0.8 < d.interval.low < d.interval.mean < d.interval.high
    assert d.interval.mean == pytest.approx(0.9)
    assert d.to_dict()["interval"]["confidence"] == 0.95 and all(d.checks.values())


def test_a_tie_is_not_an_improvement():
    same = [1, 0] * 50
    d = decide(ms("candidate", same), ms("champion v1", same), GATE, "exact_match")
    assert not d.promote and not d.checks["improvement"]
    assert d.interval.low == d.interval.high == 0.0


def test_a_small_noisy_gain_is_not_promoted_though_the_mean_clears_min_improvement():
    # 6 wins, 3 losses in 60 examples: +0.05 on average, but the interval reaches below zero.
    cand = [1] * 6 + [0] * 3 + [1] * 20 + [0] * 31
    ref = [0] * 6 + [1] * 3 + [1] * 20 + [0] * 31
    d = decide(ms("candidate", cand), ms("champion v1", ref), GATE, "exact_match")
    assert d.interval.mean == pytest.approx(0.05) and d.interval.low < 0 and not d.promote


def test_too_few_examples_never_promote_whatever_the_numbers():
    d = decide(ms("candidate", [1] * 10), ms("base", [0] * 10), GATE, "exact_match")
    assert not d.promote and d.interval is None
    assert any("only 10 paired examples < gate.min_examples 30" in r for r in d.reasons)


def test_unpaired_lengths_are_refused():
    d = decide(ms("candidate", [1] * 40), ms("champion v1", [0] * 39), GATE, "exact_match")
    assert not d.promote and "not a paired comparison" in d.reasons[0]


def test_validity_floor():
    d = decide(ms("candidate", [1] * 40, valid=0.6), ms("base", [0] * 40), GATE, "exact_match")
    assert not d.promote and d.checks == {"improvement": True, "validity": False, "guardrails": True}


def test_guardrail_metric_regression_fails():
    cand = ms("candidate", [1] * 40, metrics={"field_accuracy": 0.80})
    ref = ms("champion v1", [0] * 40, metrics={"field_accuracy": 0.90})
    d = decide(cand, ref, GATE, "exact_match", guardrails=["field_accuracy"])
    assert not d.promote and not d.checks["guardrails"] and d.checks["improvement"]
    within = ms("candidate", [1] * 40, metrics={"field_accuracy": 0.89})
    assert decide(within, ref, GATE, "exact_match", guardrails=["field_accuracy"]).promote


def test_generation_speed_guardrail():
    ref = ms("base", [0] * 40, speed={"tokens_per_s": 100.0})
    slow = ms("candidate", [1] * 40, speed={"tokens_per_s": 40.0})
    ok = ms("candidate", [1] * 40, speed={"tokens_per_s": 60.0})
    assert not decide(slow, ref, GATE, "exact_match").promote
    assert decide(ok, ref, GATE, "exact_match").promote


def test_forgetting_is_judged_against_the_base_even_when_the_reference_is_a_champion():
    base = ms("base", [0] * 40, forgetting=[0.8] * 20)
    champ = ms("champion v1", [0] * 40, forgetting=[0.5] * 20)
    forgot = ms("candidate", [1] * 40, forgetting=[0.65] * 20)
    d = decide(forgot, champ, GATE, "exact_match", base=base)
    assert not d.promote and not d.checks["forgetting"] and "vs base 0.800" in " ".join(d.reasons)
    kept = ms("candidate", [1] * 40, forgetting=[0.78] * 20)
    assert decide(kept, champ, GATE, "exact_match", base=base).promote


def _leak(exposures, completed=(), pii=0):
    return {"canaries": [{"digest": f"d{i}", "exposure": e, "completed": i in completed}
                         for i, e in enumerate(exposures)], "pii_hits": pii, "answers_scanned": 50}


def test_a_completed_canary_fails_the_gate():
    d = decide(ms("candidate", [1] * 40, leak=_leak([1.0, 2.0], completed={1})), ms("base", [0] * 40),
               GATE, "exact_match")
    assert not d.promote and not d.checks["leak"]
    assert "canaries completed from their prefix: 1 of 2" in " ".join(d.reasons)


def test_high_exposure_fails_when_gated_and_a_pii_hit_always():
    gated = GateConfig(bootstrap_samples=2000, max_exposure=6.0)
    assert not decide(ms("candidate", [1] * 40, leak=_leak([9.5])), ms("base", [0] * 40), gated, "exact_match").promote
    d = decide(ms("candidate", [1] * 40, leak=_leak([9.5])), ms("base", [0] * 40), GATE, "exact_match")
    assert d.promote and "canary exposure max 9.50 bits (not gated" in " ".join(d.reasons)
    assert not decide(ms("candidate", [1] * 40, leak=_leak([1.0], pii=1)), ms("base", [0] * 40), GATE,
                      "exact_match").promote
    assert decide(ms("candidate", [1] * 40, leak=_leak([1.0, 3.0])), ms("base", [0] * 40), GATE, "exact_match").promote


def test_metric_without_per_example_values_pairs_the_tasks_per_example_metric():
    cand = ModelScore("candidate", {"macro_f1": 0.9, "accuracy": 0.9, "valid": 1.0},
                      {"accuracy": [1] * 36 + [0] * 4, "valid": [1] * 40}, speed={"tokens_per_s": 50.0})
    base = ModelScore("base", {"macro_f1": 0.1, "accuracy": 0.1, "valid": 1.0},
                      {"accuracy": [0] * 36 + [1] * 4, "valid": [1] * 40}, speed={"tokens_per_s": 50.0})
    d = decide(cand, base, GATE, "macro_f1")
    assert d.promote and d.interval.paired_on == "accuracy"
    assert "macro_f1 has no per-example values; the interval pairs accuracy" in d.reasons[0]


def test_bootstrap_is_reproducible_with_a_seed():
    rng = np.random.default_rng(3)
    c, r = rng.integers(0, 2, 200).tolist(), rng.integers(0, 2, 200).tolist()
    a = paired_bootstrap(c, r, samples=3000, seed=7)
    assert a == paired_bootstrap(c, r, samples=3000, seed=7)
    assert a != paired_bootstrap(c, r, samples=3000, seed=8)
    assert a.low < a.mean < a.high
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap([1, 0], [1])


@pytest.mark.parametrize("kind, cand, ref, guardrails", [
    ("guardrail_metrics", {}, {"metrics": {"field_accuracy": 0.9}}, ["field_accuracy"]),
    ("speed", {"speed": {}}, {}, []),
    ("speed", {"speed": {"tokens_per_s": 0.0}}, {}, []),  # 0 tokens/s used to pass unchecked
    ("forgetting", {"forgetting": [1.0] * 10}, {"forgetting": None}, []),
    ("leak", {"leak": {"canaries": []}}, {}, []),
    ("slices", {"slices": {"original": {"range": [0, 40], "summary": {}}, "curated": {"range": [40, 40], "summary": {}}}},
     {"slices": {"original": {"range": [0, 40], "summary": {}}}}, []),
])
def test_a_guardrail_that_cannot_be_computed_fails_unless_skipped_by_configuration(kind, cand, ref, guardrails):
    """Each of these was skipped without a word: the gate now fails naming it, or says SKIP when the
    configuration lists it."""
    c = ms("candidate", [1] * 40, **cand)
    r = ms("champion v1", [0] * 40, **ref)
    d = decide(c, r, GATE, "exact_match", guardrails=guardrails)
    assert not d.promote and any(x.startswith("FAIL") and "cannot be" in x for x in d.reasons), d.reasons
    skipping = GATE.model_copy(update={"skip_uncomputable": [kind]})
    d = decide(c, r, skipping, "exact_match", guardrails=guardrails)
    assert d.promote and any(x.startswith("SKIP") and kind in x for x in d.reasons), d.reasons
