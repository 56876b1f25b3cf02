"""The probes' batching by memory budget (issue 26): every item scored once, batches within the budget,
and the numbers equal scoring each item alone without padding, whatever the batch split."""

import random

import pytest
import torch

from pipeline.evaluate.probes import _token_stats, plan_batches


def _items(vocab: int, n: int = 37, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, 60)
        out.append(([rng.randrange(1, vocab) for _ in range(length)], rng.randint(1, length - 1)))
    return out


def test_batches_cover_every_item_once_and_respect_the_budget():
    items = _items(512, 200)
    for budget_mb in (0.01, 0.5, 4.0, 1e6):
        batches = plan_batches(items, 512, budget_mb, max_tokens=2048)
        assert sorted(i for b in batches for i in b) == list(range(len(items)))
        for b in batches:
            width = max(len(items[i][0]) for i in b)
            keep = max(len(items[i][0]) - items[i][1] for i in b) + 1
            assert len(b) == 1 or (len(b) * keep * 512 * 8 <= budget_mb * 2**20 and len(b) * width <= 2048)
    assert len(plan_batches(items, 512, 0.01)) > len(plan_batches(items, 512, 4.0)) >= 1


def test_scores_equal_each_item_alone_whatever_the_split(tiny_base):
    from pipeline.modeling import load_base

    model, tok = load_base(tiny_base)
    vocab = model.get_output_embeddings().weight.shape[0]
    items = _items(vocab)
    alone = []
    with torch.no_grad():
        for ids, start in items:
            t = torch.tensor([ids])
            logp = torch.log_softmax(model(input_ids=t).logits[0, :-1].float(), -1)
            target = t[0, 1:]
            span = slice(start - 1, len(ids) - 1)
            picked = logp.gather(-1, target[:, None])[:, 0][span]
            hit = (logp.argmax(-1) == target)[span]
            alone.append((float(picked.sum()), float(hit.sum()) / len(picked)))
    for budget_mb in (0.05, 1.0, 1024.0):  # many small batches, a few, one
        got = _token_stats(model, tok, items, budget_mb=budget_mb)
        for (lp, acc), (lp0, acc0) in zip(got, alone):
            assert lp == pytest.approx(lp0, abs=1e-3) and acc == pytest.approx(acc0, abs=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_128k_vocabulary_on_the_gpu_stays_within_the_budget():
    """Llama-3.2-1B's shape and vocabulary (random weights): 64 items of 512 tokens. A fixed batch of 64 with
    a float32 log-softmax over every position needed ~16.8 GB per copy of the logits; the budgeted batches
    keep the probe's peak to the model's activations plus the budget."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    rng = random.Random(0)
    items = [([rng.randrange(1, 128256) for _ in range(512)], 480) for _ in range(64)]
    tok = SimpleNamespace(pad_token_id=0)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got = _token_stats(model, tok, items, budget_mb=1024.0)
    peak_mb = (torch.cuda.max_memory_allocated() - held) / 2**20
    old_mb = 64 * 511 * 128256 * 4 / 2**20
    print(f"probe peak above the model: {peak_mb:.0f} MB (budget 1024 MB; one fixed-64 logits copy: {old_mb:.0f} MB)")
    assert peak_mb < 4096
    with torch.no_grad():  # the first items alone, unpadded: the same scores within bf16 rounding
        for (ids, start), (lp, _) in list(zip(items, got))[:4]:
            t = torch.tensor([ids], device="cuda")
            logp = torch.log_softmax(model(input_ids=t).logits[0, :-1].float(), -1)
            alone = float(logp.gather(-1, t[0, 1:, None])[:, 0][start - 1:].sum())
            assert lp == pytest.approx(alone, rel=0.02)
