import pytest

from pipeline.config import GateConfig
from pipeline.evaluate.scoring import aggregate, score
from pipeline.release.gate import ModelScore, decide, mcnemar_exact

GATE = GateConfig()


def ms(name, em, valid=1.0, per=None):
    return ModelScore(name, {"exact_match": em, "json_valid": valid, "field_accuracy": em}, per or [])


def test_first_run_compares_with_base_without_significance():
    d = decide(ms("candidate", 0.9), ms("base", 0.0), GATE, reference_is_champion=False)
    assert d.promote and d.p_value is None and d.reference == "base"


def test_invalid_json_blocks_promotion_even_when_better():
    d = decide(ms("candidate", 0.5, valid=0.6), ms("base", 0.0), GATE, False)
    assert not d.promote and any("json_valid 0.600 < floor" in r for r in d.reasons)


def test_small_gain_over_champion_is_not_enough():
    cand = ms("candidate", 0.91, per=[1] * 91 + [0] * 9)
    champ = ms("champion v1", 0.90, per=[1] * 90 + [0] * 10)
    d = decide(cand, champ, GATE, True)
    assert not d.promote


def test_significant_gain_over_champion_promotes():
    cand = ms("candidate", 0.95, per=[1] * 95 + [0] * 5)
    champ = ms("champion v1", 0.70, per=[1] * 70 + [0] * 30)
    d = decide(cand, champ, GATE, True)
    assert d.promote and d.p_value < 0.05


def test_large_but_noisy_gain_is_rejected_by_mcnemar():
    # 3 wins, 0 losses on 10 examples: +30 points but p = 1/8
    cand = ms("candidate", 0.8, per=[1] * 8 + [0] * 2)
    champ = ms("champion v1", 0.5, per=[1] * 5 + [0] * 5)
    d = decide(cand, champ, GATE, True)
    assert not d.promote and d.p_value == pytest.approx(0.125)


def test_mcnemar_exact_values():
    assert mcnemar_exact([1, 1, 1, 1, 1], [0, 0, 0, 0, 0]) == pytest.approx(1 / 32)
    assert mcnemar_exact([1, 0], [0, 1]) == pytest.approx(0.75)
    assert mcnemar_exact([1, 1], [1, 1]) == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact([1], [1, 0])


def test_scoring():
    ref = '{"category": "billing", "priority": "high"}'
    assert score(ref, ref) == {"json_valid": 1.0, "exact_match": 1.0, "field_accuracy": 1.0}
    assert score('{"category": "billing", "priority": "low"}', ref)["field_accuracy"] == 0.5
    assert score("billing high", ref) == {"json_valid": 0.0, "exact_match": 0.0, "field_accuracy": 0.0}
    assert score("[1]", ref)["json_valid"] == 0.0
    assert aggregate([score(ref, ref), score("x", ref)])["exact_match"] == 0.5
