"""The embedded base is pretrained: deterministically, with its loss and inputs recorded, and it learns."""

import json

from pipeline.config import BaseModelConfig
from pipeline.hashing import file_sha256
from pipeline.train.base_model import build_builtin
from pipeline.train.curriculum import conversations
from tests.conftest import ROOT

SMALL = BaseModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=1, vocab_size=512,
                        pretrain_steps=30, pretrain_batch_size=8, pretrain_seq_len=64, pretrain_lr=1e-2)


def test_pretrained_base_is_deterministic_and_records_its_run(tmp_path, clean_demo):
    corpus = [clean_demo / "train/clean.jsonl", ROOT / "data/raw/generic_chat.jsonl"]
    a = build_builtin(SMALL, corpus[:1], tmp_path / "a", progress=lambda s: None, chat_files=corpus[1:])
    b = build_builtin(SMALL, corpus[:1], tmp_path / "b", progress=lambda s: None, chat_files=corpus[1:])
    assert file_sha256(a / "model.safetensors") == file_sha256(b / "model.safetensors")
    report = json.loads((a / "pretrain.json").read_text())
    assert report["steps"] == 30 and report["tokens"] == 30 * 8 * 64
    assert report["config"]["pretrain_steps"] == 30 and set(report["inputs"]) == {str(f) for f in corpus}
    curve = [p["loss"] for p in report["loss_curve"]]
    assert len(curve) == 3 and curve[-1] < curve[0] - 0.5  # it learns, down from about ln(vocab)


def test_random_base_when_pretraining_is_off(tmp_path, clean_demo):
    cfg = SMALL.model_copy(update={"pretrain_steps": 0})
    out = build_builtin(cfg, [clean_demo / "train/clean.jsonl"], tmp_path / "r", progress=lambda s: None)
    assert json.loads((out / "pretrain.json").read_text())["steps"] == 0


def test_curriculum_answers_come_from_the_prompt():
    for conv in conversations(300, ["alpha", "beta", "gamma", "delta", "omega", "sigma"], seed=3):
        user, answer = conv[0]["content"], conv[1]["content"]
        assert answer and answer in user
    assert conversations(5, ["a"], seed=1) == conversations(5, ["a"], seed=1)
