"""Continual training (train.continual): from the champion's adapter, with an EWC penalty, on the real TRL
+ peft path with a tiny CPU model."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.config import ConfigError, TrainConfig
from pipeline.train import continual
from pipeline.train.trainer import train


def cfg(tmp: Path, name: str, lr: float = 2e-3, **kw) -> TrainConfig:
    trl = dict(max_steps=10, per_device_train_batch_size=8, logging_steps=5, save_steps=5, learning_rate=lr)
    return TrainConfig(out_dir=str(tmp / name), checkpoint_dir=str(tmp / "ckpt"), lora_r=4, lora_alpha=8,
                       trl=trl, continual={"from_champion": True, "fisher_samples": 32, **kw.pop("continual", {})}, **kw)


@pytest.fixture(scope="module")
def champion(tiny_base, clean_demo, tmp_path_factory):
    d = tmp_path_factory.mktemp("champion")
    m = train(cfg(d, "v1"), tiny_base, clean_demo / "train/clean.jsonl")
    return d / "v1", m


def _weights(adapter: Path) -> dict:
    return load_file(str(adapter / "adapter_model.safetensors"))


def test_fisher_is_stored_with_the_adapter(champion):
    adapter, m = champion
    fisher = load_file(str(adapter / continual.FISHER_FILE))
    weights = _weights(adapter)
    # One non-negative entry per trained LoRA tensor, same shapes, keyed like the adapter file.
    assert set(fisher) == {k.replace(".weight", ".weight") for k in weights}
    assert all(fisher[k].shape == weights[k].shape and (fisher[k] >= 0).all() for k in weights)
    assert sum(float(f.sum()) for f in fisher.values()) > 0
    with safe_open(str(adapter / continual.FISHER_FILE), "pt") as fh:
        assert fh.metadata()["samples"] == "32"
    assert m["continual"]["from"] is None  # the first version starts from scratch


def test_training_from_the_champion_resumes_its_weights(champion, tiny_base, clean_demo, tmp_path):
    adapter, _ = champion
    # Learning rate 0: the result is exactly where training started, i.e. the champion's weights.
    m = train(cfg(tmp_path, "v2", lr=0.0), tiny_base, clean_demo / "eval/clean.jsonl", init_adapter=adapter)
    before, after = _weights(adapter), _weights(tmp_path / "v2")
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert m["continual"]["from"] == str(adapter)
    # And with learning, it moves away from there (not from a fresh adapter: lora_B is non-zero from step 0).
    train(cfg(tmp_path, "v2b", continual={"ewc_lambda": 0.0}), tiny_base, clean_demo / "eval/clean.jsonl",
          init_adapter=adapter)
    moved = _weights(tmp_path / "v2b")
    assert any(not torch.equal(before[k], moved[k]) for k in before)


def _distance(a: dict, b: dict) -> float:
    return sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5


def test_the_ewc_penalty_holds_the_parameters_near_the_champion(champion, tiny_base, clean_demo, tmp_path):
    adapter, _ = champion
    free = train(cfg(tmp_path, "free"), tiny_base, clean_demo / "eval/clean.jsonl", init_adapter=adapter)
    held = train(cfg(tmp_path, "held", continual={"ewc_lambda": 1e4}), tiny_base, clean_demo / "eval/clean.jsonl",
                 init_adapter=adapter)
    assert held["continual"]["fisher_source"] == "champion"
    before = _weights(adapter)
    assert _distance(_weights(tmp_path / "held"), before) < 0.5 * _distance(_weights(tmp_path / "free"), before)
    assert free["continual"]["fisher_source"] is None


def test_a_champion_without_fisher_gets_one_estimated_and_a_reshaped_adapter_is_refused(
        champion, tiny_base, clean_demo, tmp_path):
    import shutil

    adapter, _ = champion
    bare = tmp_path / "bare"
    shutil.copytree(adapter, bare)
    (bare / continual.FISHER_FILE).unlink()
    m = train(cfg(tmp_path, "v2", continual={"ewc_lambda": 10.0}), tiny_base, clean_demo / "eval/clean.jsonl",
              init_adapter=bare)
    assert m["continual"]["fisher_source"] == "estimated at start"
    with pytest.raises(ConfigError, match="train.lora_r: this run 8, champion 4"):
        train(TrainConfig(**{**cfg(tmp_path, "v3").model_dump(), "lora_r": 8}), tiny_base,
              clean_demo / "eval/clean.jsonl", init_adapter=adapter)


def test_ewc_needs_a_per_record_loss():
    with pytest.raises(ValueError, match="train.continual.ewc_lambda"):
        TrainConfig(method="dpo", continual={"from_champion": True, "ewc_lambda": 1.0})
