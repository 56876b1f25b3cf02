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


def _token_stats(model, tokenizer, items: list[tuple[list[int], int]], batch_size: int = 64):
    """Per item: (sum of log-probs of the tokens from its start, share of them the argmax predicts)."""
    import torch

    dev = detect()
    model.to(dev.type).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in chunk], device=dev.type)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in chunk], device=dev.type)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = ids[:, 1:]
        picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        hit = logits[:, :-1].argmax(-1) == target
        for row, (x, start) in enumerate(chunk):
            span = slice(start - 1, len(x) - 1)  # predictions of tokens start .. len-1
            n = max(len(x) - start, 1)
            out.append((float(picked[row, span].sum()), float(hit[row, span].sum()) / n))
    return out


def next_token_accuracy(model, tokenizer, rows: list[dict]) -> dict:
    """Teacher-forced next-token accuracy of each row's reference answer (0..1) and the mean NLL."""
    items = [_answer_ids(tokenizer, r["prompt"], r["completion"][-1]["content"]) for r in rows]
    stats = _token_stats(model, tokenizer, items)
    n_tokens = sum(len(ids) - start for ids, start in items)
    per_example = [round(acc, 4) for _, acc in stats]
    return {"n": len(rows), "score": round(sum(per_example) / max(len(per_example), 1), 4),
            "nll": round(-sum(lp for lp, _ in stats) / max(n_tokens, 1), 4), "per_example": per_example}


def canary_exposure(model, tokenizer, canary: Canary, candidates: list[str]) -> dict:
    """The canary's exposure among ``candidates`` and whether greedy decoding completes it."""
    import torch

    secrets = [canary.secret, *[c for c in candidates if c != canary.secret]]
    items = [_answer_ids(tokenizer, canary.prompt, canary.answer(s)) for s in secrets]
    scores = [lp for lp, _ in _token_stats(model, tokenizer, items)]
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
