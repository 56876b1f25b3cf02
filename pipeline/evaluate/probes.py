"""Probes beyond the task's metrics: forgetting of generic skills and leakage of training secrets.

- ``next_token_accuracy``: on generic prompts the fine-tune never saw, the share of reference answer
  tokens the model predicts (teacher-forced, greedy), per example; the gate compares it with the base's.
- ``canary_exposure``: each planted canary's secret ranked by likelihood among random secrets of the
  same format; exposure = log2(candidates + 1) - log2(rank), about 1 bit for a secret never seen, the
  maximum when it is the likeliest (Carlini et al., "The Secret Sharer"). Also whether greedy decoding
  from the canary's prefix reproduces the secret.
- ``pii_hits``: generated answers that contain a value the sanitizer redacted (compared by keyed digest).
"""

from __future__ import annotations

import math

from pipeline.canaries import Canary
from pipeline.device import detect


def _answer_ids(tokenizer, prompt: list[dict], answer: str) -> tuple[list[int], int]:
    """Token ids of ``prompt`` + ``answer`` and where the answer starts."""
    p = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return p_ids + a_ids, len(p_ids)


def plan_batches(items: list[tuple[list[int], int]], vocab: int, budget_mb: float,
                 max_tokens: int = 16384) -> list[list[int]]:
    """Indices of ``items`` grouped into batches by a memory budget instead of a fixed count: similar
    lengths together (less padding), each batch's float32 logits over its scored positions (rows x
    positions x vocab x 4 bytes, twice: logits and their normaliser) within ``budget_mb``, and its
    rows x width within ``max_tokens`` (the activations). A single item that alone exceeds the budget
    still gets a batch of its own."""
    order = sorted(range(len(items)), key=lambda i: (len(items[i][0]), i))
    batches: list[list[int]] = []
    budget = budget_mb * 2**20
    cur: list[int] = []
    width = scored = 0
    for i in order:
        ids, start = items[i]
        w, k = max(width, len(ids)), max(scored, len(ids) - start + 1)
        rows = len(cur) + 1
        if cur and (rows * k * vocab * 8 > budget or rows * w > max_tokens):
            batches.append(cur)
            cur, w, k = [], len(ids), len(ids) - start + 1
        cur.append(i)
        width, scored = w, k
    if cur:
        batches.append(cur)
    return batches


def _token_stats(model, tokenizer, items: list[tuple[list[int], int]], budget_mb: float = 1024.0):
    """Per item: (sum of log-probs of the tokens from its start, share of them the argmax predicts).

    Left-padded so every answer ends at the last position; the model computes logits only for the last
    K positions (``logits_to_keep``: K = the longest answer + 1), and the log-softmax runs only there. A
    128k vocabulary at 512 tokens no longer costs 17 GB a copy for a batch of 64."""
    import torch

    dev = detect()
    model.to(dev.type).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    vocab = model.get_output_embeddings().weight.shape[0]
    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(items)
    for batch in plan_batches(items, vocab, budget_mb):
        chunk = [items[i] for i in batch]
        width = max(len(ids) for ids, _ in chunk)
        keep = max(len(ids) - start for ids, start in chunk) + 1
        ids = torch.tensor([[pad] * (width - len(x)) + x for x, _ in chunk], device=dev.type)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x, _ in chunk], device=dev.type)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           logits_to_keep=keep).logits[:, :-1].float()
        target = ids[:, width - keep + 1:]
        picked = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        hit = logits.argmax(-1) == target
        for row, i in enumerate(batch):
            x, start = items[i]
            n = len(x) - start  # its answer tokens are the last n of the kept predictions
            span = slice(keep - 1 - n, keep - 1)
            out[i] = (float(picked[row, span].sum()), float(hit[row, span].sum()) / max(n, 1))
    return out


def next_token_accuracy(model, tokenizer, rows: list[dict], budget_mb: float = 1024.0) -> dict:
    """Teacher-forced next-token accuracy of each row's reference answer (0..1) and the mean NLL."""
    items = [_answer_ids(tokenizer, r["prompt"], r["completion"][-1]["content"]) for r in rows]
    stats = _token_stats(model, tokenizer, items, budget_mb)
    n_tokens = sum(len(ids) - start for ids, start in items)
    per_example = [round(acc, 4) for _, acc in stats]
    return {"n": len(rows), "score": round(sum(per_example) / max(len(per_example), 1), 4),
            "nll": round(-sum(lp for lp, _ in stats) / max(n_tokens, 1), 4), "per_example": per_example}


def canary_exposure(model, tokenizer, canary: Canary, candidates: list[str], budget_mb: float = 1024.0) -> dict:
    """The canary's exposure among ``candidates`` and whether greedy decoding completes it."""
    import torch

    secrets = [canary.secret, *[c for c in candidates if c != canary.secret]]
    items = [_answer_ids(tokenizer, canary.prompt, canary.answer(s)) for s in secrets]
    scores = [lp for lp, _ in _token_stats(model, tokenizer, items, budget_mb)]
    rank = 1 + sum(1 for s in scores[1:] if s >= scores[0])
    exposure = math.log2(len(secrets)) - math.log2(rank)
    # Completion: greedy continuation of the prompt and the answer's prefix.
    dev = detect()
    text = tokenizer.apply_chat_template(canary.prompt, tokenize=False, add_generation_prompt=True) + canary.prefix
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(dev.type)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=2 * len(canary.secret) + 4, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    continuation = tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    digits = "".join(ch for ch in continuation if ch.isdigit())
    # The continuation itself is not returned: it may hold the secret, and the result is logged.
    return {"digest": canary.digest, "rank": rank, "candidates": len(secrets), "exposure": round(exposure, 3),
            "completed": digits.startswith(canary.secret), "_continuation": continuation}


def pii_hits(texts: list[str], digests: set[str], redactor, key: bytes) -> int:
    """How many ``texts`` contain a value whose keyed digest the sanitizer recorded as redacted."""
    from pipeline.pii import pii_digests

    if not digests:
        return 0
    return sum(1 for t in texts if pii_digests(t, redactor, key) & digests)
