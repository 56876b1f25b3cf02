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
