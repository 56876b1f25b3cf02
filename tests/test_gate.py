import pytest

from pipeline.config import GateConfig
from pipeline.release.gate import ModelScore, decide, sign_test

GATE = GateConfig()


def ms(name, em, valid=1.0, per=None):
    per = per or []
    return ModelScore(name, {"exact_match": em, "valid": valid}, {"exact_match": per, "valid": [1.0] * len(per)})


def test_first_run_compares_with_base_without_significance():
    d = decide(ms("candidate", 0.9), ms("base", 0.0), GATE, False, "exact_match")
    assert d.promote and d.p_value is None and d.reference == "base" and d.metric == "exact_match"


def test_invalid_answers_block_promotion_even_when_better():
    d = decide(ms("candidate", 0.5, valid=0.6), ms("base", 0.0), GATE, False, "exact_match")
    assert not d.promote and any("valid answers 0.600 < floor" in r for r in d.reasons)


def test_small_gain_over_champion_is_not_enough():
    cand = ms("candidate", 0.91, per=[1] * 91 + [0] * 9)
    champ = ms("champion v1", 0.90, per=[1] * 90 + [0] * 10)
    assert not decide(cand, champ, GATE, True, "exact_match").promote


def test_significant_gain_over_champion_promotes():
    cand = ms("candidate", 0.95, per=[1] * 95 + [0] * 5)
    champ = ms("champion v1", 0.70, per=[1] * 70 + [0] * 30)
    d = decide(cand, champ, GATE, True, "exact_match")
    assert d.promote and d.p_value < 0.05


def test_large_but_noisy_gain_is_rejected():
    # 3 wins, 0 losses on 10 examples: +30 points but p = 1/8
    cand = ms("candidate", 0.8, per=[1] * 8 + [0] * 2)
    champ = ms("champion v1", 0.5, per=[1] * 5 + [0] * 5)
    d = decide(cand, champ, GATE, True, "exact_match")
    assert not d.promote and d.p_value == pytest.approx(0.125)


def test_gate_decides_on_a_continuous_metric():
    cand = ModelScore("candidate", {"valid": 1.0, "rouge_l": 0.8}, {"rouge_l": [0.8] * 10, "valid": [1.0] * 10})
    champ = ModelScore("champion v1", {"valid": 1.0, "rouge_l": 0.5}, {"rouge_l": [0.5] * 10, "valid": [1.0] * 10})
    d = decide(cand, champ, GATE, True, "rouge_l")
    assert d.promote and d.p_value == pytest.approx(1 / 1024)
    assert "rouge_l 0.800 vs champion v1 0.500" in d.reasons[1]


def test_sign_test_values():
    assert sign_test([1, 1, 1, 1, 1], [0, 0, 0, 0, 0]) == pytest.approx(1 / 32)
    assert sign_test([1, 0], [0, 1]) == pytest.approx(0.75)
    assert sign_test([1, 1], [1, 1]) == 1.0
    assert sign_test([0.7, 0.2], [0.5, 0.2]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        sign_test([1], [1, 0])
