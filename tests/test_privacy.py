"""Differentially private LoRA (train.privacy) on the real TRL + peft + Opacus path with a tiny CPU model."""

import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from pipeline.config import ConfigError, GateConfig, TrainConfig
from pipeline.release.gate import ModelScore, decide
from pipeline.train import privacy
from pipeline.train.trainer import train


def dp_cfg(tmp: Path, **priv) -> TrainConfig:
    return TrainConfig(out_dir=str(tmp / "adapter"), checkpoint_dir=str(tmp / "ckpt"), lora_r=4, lora_alpha=8,
                       fused_lora=False, trl=dict(max_steps=12, per_device_train_batch_size=8, logging_steps=4,
                                                  save_steps=6),
                       privacy={"enabled": True, **priv})


def _rows(path: Path) -> int:
    return sum(1 for _ in open(path, encoding="utf-8"))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_spent_is_the_accountants_for_the_steps_taken(tiny_base, clean_demo, tmp_path, accountant):
    from opacus.accountants import PRVAccountant, RDPAccountant

    cfg = dp_cfg(tmp_path, target_epsilon=4.0, accountant=accountant)
    m = train(cfg, tiny_base, clean_demo / "train/clean.jsonl")
    pr = m["privacy"]
    n = m["train_samples"]  # the rows trained on (a record with no trainable turn is none)
    assert pr["rows"] == n and abs(n - _rows(clean_demo / "train/clean.jsonl")) <= 2 and pr["steps"] == m["steps"] == 12
    assert pr["sample_rate"] == pytest.approx(8 / n, rel=1e-4)
    assert pr["delta"] == pytest.approx(1 / (10 * n))  # below 1/rows by default
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(pr["noise_multiplier"], 8 / n, 12)]
    assert pr["epsilon"] == pytest.approx(acc.get_epsilon(delta=pr["delta"]), rel=2e-3)
    assert pr["epsilon"] <= 4.0 * 1.02  # calibrated for the target
    assert pr["noise_multiplier"] > 0
    # Written where the registry reads it.
    assert json.loads((tmp_path / "adapter/train_metrics.json").read_text())["privacy"]["epsilon"] == pr["epsilon"]


def test_given_noise_multiplier_is_used_and_accounted(tiny_base, clean_demo, tmp_path):
    cfg = dp_cfg(tmp_path, noise_multiplier=1.3, max_grad_norm=0.5, delta=1e-5)
    m = train(cfg, tiny_base, clean_demo / "train/clean.jsonl")
    pr, n = m["privacy"], m["train_samples"]
    assert pr["noise_multiplier"] == 1.3 and pr["max_grad_norm"] == 0.5 and pr["delta"] == 1e-5
    assert pr["epsilon"] == pytest.approx(privacy.epsilon_spent("rdp", 1.3, 8 / n, 12, 1e-5), abs=1e-4)


def _dp_model(tiny_base):
    from peft import get_peft_model

    from pipeline.modeling import load_base
    from pipeline.train.trainer import lora_config

    torch.manual_seed(0)
    model, tok = load_base(tiny_base)
    model = get_peft_model(model, lora_config(TrainConfig(lora_r=4, lora_alpha=8)))
    for n, p in model.named_parameters():  # a trained adapter: B is zero at init, so no gradient reaches A
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    return model, tok


def _batch(tok, texts: list[tuple[str, str]]) -> dict:
    """Prompt-completion rows as the trainer collates them: labels -100 outside the completion."""
    enc = [(tok(p, add_special_tokens=False)["input_ids"], tok(c, add_special_tokens=False)["input_ids"]) for p, c in texts]
    width = max(len(a) + len(b) for a, b in enc)
    ids, att, lab = [], [], []
    for a, b in enc:
        pad = width - len(a) - len(b)
        ids.append(a + b + [0] * pad)
        att.append([1] * (len(a) + len(b)) + [0] * pad)
        lab.append([-100] * len(a) + b + [-100] * pad)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(att), "labels": torch.tensor(lab)}


CRAFTED = [("Ticket: printer jam", " hardware"), ("Ticket: refund please", " billing"),
           # An outlier: a long, unlikely completion, whose gradient is far above the bound.
           ("x", " zq zq zq zq zq zq zq zq zq zq zq zq zq zq zq zq zq zq zq zq zq zq zq"),
           ("Ticket: cannot log in to the portal since Monday", " account")]


def test_per_sample_gradients_are_each_rows_own_gradient(tiny_base):
    """Opacus' per-sample gradient of row i equals the gradient of row i trained alone: the per-row loss
    keeps the other rows out of it (the clipping bound is then a bound per row)."""
    from opacus import GradSampleModule

    model, tok = _dp_model(tiny_base)
    GradSampleModule(model, batch_first=True, loss_reduction="mean")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    privacy.per_row_loss(model, _batch(tok, CRAFTED)).backward()
    per_sample = {n: p.grad_sample.clone() for n, p in params.items()}
    for i, row in enumerate(CRAFTED):
        model.zero_grad(set_to_none=True)
        for p in params.values():
            p.grad_sample = None
        privacy.per_row_loss(model, _batch(tok, [row])).backward()
        for n, p in params.items():
            assert torch.allclose(per_sample[n][i], p.grad, atol=1e-5, rtol=1e-3), (n, i)


def test_clipped_per_example_gradients_never_exceed_the_bound(tiny_base):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    bound = 0.05
    model, tok = _dp_model(tiny_base)
    GradSampleModule(model, batch_first=True, loss_reduction="mean")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=bound,
                      expected_batch_size=1, loss_reduction="mean")
    for row in CRAFTED:  # one row per step: each step's summed gradient is that row's clipped gradient
        opt.zero_grad(set_to_none=True)
        privacy.per_row_loss(model, _batch(tok, [row])).backward()
        raw = torch.sqrt(sum((p.grad_sample.reshape(1, -1) ** 2).sum() for p in params)).item()
        opt.step()
        clipped = torch.sqrt(sum((p.grad ** 2).sum() for p in params)).item()
        assert clipped <= bound * (1 + 1e-4), (row, raw, clipped)
        assert clipped == pytest.approx(min(raw, bound), rel=1e-3)
    # The crafted outlier really was clipped (its raw gradient is far above the bound).
    opt.zero_grad(set_to_none=True)
    privacy.per_row_loss(model, _batch(tok, [CRAFTED[2]])).backward()
    assert torch.sqrt(sum((p.grad_sample ** 2).sum() for p in params)).item() > 10 * bound
    # And on the whole crafted batch at once: the sum of clipped rows is at most rows x bound.
    opt.step()
    opt.zero_grad(set_to_none=True)
    privacy.per_row_loss(model, _batch(tok, CRAFTED)).backward()
    opt.expected_batch_size = 1
    opt.step()
    assert torch.sqrt(sum((p.grad ** 2).sum() for p in params)).item() <= len(CRAFTED) * bound * (1 + 1e-4)


@pytest.mark.parametrize("change, key", [
    ({"method": "dpo"}, "train.method"), ({"adapter": "dora"}, "train.adapter"),
    ({"adapter": "qlora"}, "train.adapter"), ({"packing": True}, "train.packing"),
    ({"fused_lora": True}, "train.fused_lora"),
    ({"continual": {"from_champion": True, "ewc_lambda": 10.0}}, "train.continual.ewc_lambda"),
])
def test_unsupported_combinations_are_refused_naming_the_key(change, key):
    with pytest.raises(ValidationError) as err:
        TrainConfig(privacy={"enabled": True, "target_epsilon": 8.0}, **change)
    assert key in str(err.value) and "train.privacy" in str(err.value)


@pytest.mark.parametrize("trl, key", [({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
                                      ({"padding_free": True}, "padding_free"),
                                      ({"use_liger_kernel": True}, "use_liger_kernel")])
def test_trl_switches_that_break_the_guarantee_are_refused(trl, key):
    cfg = TrainConfig(fused_lora=False, trl=trl, privacy={"enabled": True, "target_epsilon": 8.0})
    with pytest.raises(ConfigError, match=f"train.trl.{key}"):
        privacy.check_supported(cfg)
    with pytest.raises(ConfigError, match="processes"):
        privacy.check_supported(TrainConfig(fused_lora=False, privacy={"enabled": True, "noise_multiplier": 1.0}),
                                world_size=2)


def test_noise_source_must_be_exactly_one():
    with pytest.raises(ValidationError, match="exactly one of target_epsilon"):
        TrainConfig(privacy={"enabled": True})
    with pytest.raises(ValidationError, match="exactly one of target_epsilon"):
        TrainConfig(privacy={"enabled": True, "target_epsilon": 1.0, "noise_multiplier": 1.0})
    assert TrainConfig().fused and not TrainConfig(privacy={"enabled": True, "noise_multiplier": 1.0}).fused


def test_group_privacy_for_records_with_several_rows(tmp_path):
    f = tmp_path / "train.jsonl"
    turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    f.write_text(json.dumps({"messages": turn * 3}) + "\n" + json.dumps({"messages": turn, "provenance": {"synthetic": True}}) + "\n")
    assert privacy.rows_per_record(f) == 6  # 3 turns, and a synthetic rewrite of a record doubles it
    eps, delta = privacy.group_guarantee(1.0, 1e-6, 3)
    assert eps == 3.0 and delta == pytest.approx(3 * math.exp(2) * 1e-6)


def _score(eps):
    n = 40
    return ModelScore("candidate", {"exact_match": 1.0, "valid": 1.0}, {"exact_match": [1.0] * n},
                      privacy=None if eps is False else {"epsilon": eps}, speed={"tokens_per_s": 100.0})


def test_gate_refuses_a_version_whose_epsilon_exceeds_the_bound():
    ref = ModelScore("base", {"exact_match": 0.0, "valid": 1.0}, {"exact_match": [0.0] * 40},
                     speed={"tokens_per_s": 100.0})
    gate = GateConfig(max_epsilon=4.0)
    over = decide(_score(8.0), ref, gate, "exact_match")
    assert not over.promote and over.checks["privacy"] is False
    assert any("epsilon 8.000 > bound 4.000" in r for r in over.reasons)
    assert decide(_score(3.5), ref, gate, "exact_match").promote
    for eps in (None, False):  # no noise (infinite epsilon) or no guarantee at all
        d = decide(_score(eps), ref, gate, "exact_match")
        assert not d.promote and d.checks["privacy"] is False
    assert "privacy" not in decide(_score(8.0), ref, GateConfig(), "exact_match").checks  # not required
