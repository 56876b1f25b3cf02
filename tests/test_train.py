"""The real TRL + peft training path on a tiny CPU model (seconds, not minutes)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import EvaluateConfig, SanitizeConfig, TrainConfig
from pipeline.evaluate import evaluate_model
from pipeline.sanitize import sanitize_files
from pipeline.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    sanitize_files([ROOT / "data/raw/tickets_train.jsonl"], d / "clean", SanitizeConfig())
    before = {k: v.clone() for k, v in load_file(tiny_base / "model.safetensors").items()}
    cfg = TrainConfig(out_dir=str(d / "adapter"), max_steps=12, batch_size=8, logging_steps=2, lora_r=4,
                      lora_alpha=8)
    metrics = train(cfg, tiny_base, d / "clean/clean.jsonl", None)
    return d, before, metrics


def test_writes_adapter_metrics_and_lineage(trained):
    d, _, metrics = trained
    files = {p.name for p in (d / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "train_metrics.json", "train_meta.json",
            "tokenizer.json"} <= files
    assert "checkpoints" not in files
    meta = json.loads((d / "adapter/train_meta.json").read_text())
    assert meta["config"]["max_steps"] == 12 and len(meta["inputs"]) == 1
    assert metrics["steps"] == 12 and len(metrics["loss_curve"]) == 6 and metrics["tokens_seen"] > 0
    assert metrics["loss_curve"][-1]["loss"] < metrics["loss_curve"][0]["loss"]


def test_base_weights_unchanged_and_adapter_trained(trained, tiny_base):
    d, before, _ = trained
    after = load_file(tiny_base / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    adapter = load_file(d / "adapter/adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: non-zero means it trained
    cfg = json.loads((d / "adapter/adapter_config.json").read_text())
    targets = {t.rsplit(".", 1)[-1] for t in cfg["target_modules"]}
    assert cfg["r"] == 4 and targets >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_evaluate_scores_base_and_adapter(trained, tiny_base, tmp_path):
    d, _, _ = trained
    cfg = EvaluateConfig(out_dir=str(tmp_path), max_examples=8, max_new_tokens=8)
    res = evaluate_model(tiny_base, d / "adapter", d / "clean/clean.jsonl", cfg)
    assert res["n"] == 8 and len(res["per_example_exact"]) == 8
    assert 0.0 <= res["exact_match"] <= res["field_accuracy"] <= 1.0


def test_from_pretrained_path_is_used_for_non_builtin_bases(tiny_base, tmp_path):
    from pipeline.base_model import build_base
    from pipeline.config import BaseModelConfig

    out = build_base(BaseModelConfig(model=str(tiny_base), out_dir=str(tmp_path / "base")), [])
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert load_file(out / "model.safetensors").keys() == load_file(tiny_base / "model.safetensors").keys()
