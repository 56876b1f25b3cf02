"""The embedded base is a pretrained LM: deterministic, with its run recorded, able to copy from the prompt."""

import json
import random

import pytest

from pipeline.config import BuiltinBaseConfig, TaskConfig
from pipeline.hashing import file_sha256
from pipeline.base.builtin import build_builtin
from pipeline.base.curriculum import conversations
from tests.conftest import ROOT

# The real path on a smaller shape: 2 layers, head_dim 32 (room for the copy circuit), fewer steps.
SMALL = BuiltinBaseConfig(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, vocab_size=512,
                          pretrain_steps=30, pretrain_batch_size=8, pretrain_seq_len=64)
QUIET = {"progress": lambda s: None}


def test_pretrained_base_is_deterministic_and_records_its_run(tmp_path, clean_demo):
    corpus = [clean_demo / "train/clean.jsonl", ROOT / "data/raw/generic_chat.jsonl"]
    a = build_builtin(SMALL, corpus[:1], tmp_path / "a", chat_files=corpus[1:], **QUIET)
    b = build_builtin(SMALL, corpus[:1], tmp_path / "b", chat_files=corpus[1:], **QUIET)
    assert file_sha256(a / "model.safetensors") == file_sha256(b / "model.safetensors")
    report = json.loads((a / "pretrain.json").read_text())
    assert report["steps"] == 30 and report["tokens"] == 30 * 8 * 64
    assert report["config"]["pretrain_steps"] == 30 and set(report["inputs"]) == {str(f) for f in corpus}
    assert report["copy_circuit"]["match_pairs"] > 0
    curve = [p["loss"] for p in report["loss_curve"]]
    assert len(curve) == 3 and curve[-1] < curve[0] - 0.5  # it learns, down from about ln(vocab)


def _second_half_accuracy(base_dir, span: int = 24, rows: int = 16) -> float:
    """Greedy next-token accuracy on the second copy of random token spans (an induction test)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    rng = random.Random(7)
    ids = [[rng.randrange(10, model.config.vocab_size) for _ in range(span)] for _ in range(rows)]
    x = torch.tensor([r + r for r in ids])
    with torch.no_grad():
        pred = model(input_ids=x).logits[:, span:-1].argmax(-1)
    return (pred == x[:, span + 1:]).float().mean().item()


def test_copy_circuit_copies_unseen_spans_and_random_weights_cannot(tmp_path, clean_demo):
    corpus = [clean_demo / "train/clean.jsonl"]
    seeded = build_builtin(SMALL.model_copy(update={"pretrain_steps": 0}), corpus, tmp_path / "s", **QUIET)
    plain = build_builtin(SMALL.model_copy(update={"pretrain_steps": 0, "copy_circuit": False}), corpus,
                          tmp_path / "p", **QUIET)
    assert _second_half_accuracy(seeded) >= 0.9
    assert _second_half_accuracy(plain) < 0.05


def test_copy_circuit_needs_room():
    with pytest.raises(ValueError, match="copy_circuit needs num_layers >= 2"):
        BuiltinBaseConfig(num_layers=1)
    with pytest.raises(ValueError, match="hidden_size >= 3 \\* head_dim"):
        BuiltinBaseConfig(hidden_size=128, num_heads=1)
    BuiltinBaseConfig(num_layers=1, copy_circuit=False)


@pytest.mark.slow
def test_fine_tune_copies_values_it_never_saw(tmp_path, clean_demo):
    """LoRA on the pretrained small base learns a task whose answers copy a value out of the prompt; the
    held-out values never occur in training, so only copying can get them right."""
    from bench.base_quality import copy_task, scores
    from pipeline.config import TrainConfig
    from pipeline.train.trainer import train

    from pipeline.config import SanitizeConfig
    from pipeline.data.sanitize import sanitize_files

    train_rows, eval_rows = copy_task(n_train=600, n_eval=40, seed=1)
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        (tmp_path / f"{name}.raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        sanitize_files([tmp_path / f"{name}.raw.jsonl"], tmp_path / name, SanitizeConfig())
    cfg = BuiltinBaseConfig(vocab_size=1024, pretrain_steps=300, pretrain_batch_size=16)  # the default shape
    base = build_builtin(cfg, [tmp_path / "train/clean.jsonl"], tmp_path / "base", **QUIET)
    tcfg = TrainConfig(out_dir=str(tmp_path / "adapter"), checkpoint_dir=str(tmp_path / "ckpt"), trl=dict(num_train_epochs=10, per_device_train_batch_size=16, learning_rate=2e-3, max_length=96, logging_steps=50))
    train(tcfg, base, tmp_path / "train/clean.jsonl")
    got = scores(base, tmp_path / "adapter", tmp_path / "eval/clean.jsonl", TaskConfig(kind="text", max_new_tokens=12))
    # Memorising the training values scores ~0 here (the random base: 0.00); the full 900-step base reaches
    # 0.94 on the 100-record version of this task (docs/benchmarks.md); 300 steps measured 0.60.
    assert got["exact_greedy"] >= 0.5, got


def test_curriculum_answers_come_from_the_prompt():
    for conv in conversations(300, ["alpha", "beta", "gamma", "delta", "omega", "sigma"], seed=3):
        user, answer = conv[0]["content"], conv[1]["content"]
        assert answer and answer in user
    assert conversations(5, ["a"], seed=1) == conversations(5, ["a"], seed=1)
