"""Start the embedded base with a working copy circuit (an induction head) instead of waiting for one.

A model that answers with values taken from its prompt (ids, names, amounts) needs an *induction head*:
one attention head that writes "the previous token was A" into every position, and a second-layer head
that, at a position holding A, attends to where A occurred before and copies the token that followed.
Trained from random weights a 2-layer model reaches this only after a long loss plateau: measured here,
no trace of it after 2,000 steps on pure repeated random spans (docs/benchmarks.md), far beyond the
base stage's budget of a few minutes on a laptop. A LoRA adapter cannot build it either (its low rank
leaves a random base unable to copy: exact match 0 on a copy task). So the builtin base writes the
circuit into its initial weights, then pretraining (full parameters) tunes it with everything else.

Layout in the residual stream (width d, head width h): dimension 0 is a constant (the embedding of
every token has 1 there), dimensions E = [1, 1+h) hold a random unit code of the token, P = the next h
dimensions the previous token's code (written by head 0 of layer 0), O = the next h the copied token's
code (written by head 0 of layer 1), which the output layer reads back as logits. The previous-token head
needs no content: constant queries and keys whose rotary phases peak at a distance of one. The induction
head compares E and P on the slowly rotating rotary pairs only, so its match does not depend on distance
(hence a large ``rope_theta``). All of it is plain Llama weights: transformers and vLLM load it as usual.
"""

from __future__ import annotations

import math

from pipeline.config import copy_circuit_fits


def seed_copy_circuit(model, seed: int, prev_logit: float = 12.0, match_logit: float = 20.0,
                      out_logit: float = 12.0) -> dict[str, float]:
    """Write a previous-token head (layer 0, head 0) and an induction head (layer 1, head 0) into a freshly
    initialised Llama. ``*_logit``: the attention-score margin of the previous-token head, the score of a
    matching key, and the logit the copied token receives. Returns the constants used (for the report)."""
    import torch

    cfg = model.config
    d, heads, max_pos = cfg.hidden_size, cfg.num_attention_heads, cfg.max_position_embeddings
    hd = d // heads
    half = hd // 2
    theta = float(cfg.rope_parameters["rope_theta"])
    if not copy_circuit_fits(d, heads, cfg.num_hidden_layers):
        raise ValueError(f"a copy circuit needs >= 2 layers and hidden_size >= 3 * head_dim + 1 (got {d}, {heads} heads)")
    gen = torch.Generator().manual_seed(seed)
    E, P, O = slice(1, 1 + hd), slice(1 + hd, 1 + 2 * hd), slice(1 + 2 * hd, 1 + 3 * hd)
    used = 1 + 3 * hd
    freqs = [theta ** (-2 * i / hd) for i in range(half)]
    # RMSNorm rescales each position to root-mean-square 1: with a constant 1 and unit-norm codes in k
    # blocks (the rest near 0), every coordinate is multiplied by sqrt(d / k).
    scale = [math.sqrt(d / blocks) for blocks in (2, 3, 4)]
    with torch.no_grad():
        code = torch.randn(cfg.vocab_size, hd, generator=gen)
        code /= code.norm(dim=1, keepdim=True)
        emb = model.model.embed_tokens.weight
        emb[:, :used] = 0.0
        emb[:, 0] = 1.0
        emb[:, E] = code

        # Layer 0, head 0 attends to the previous position: q = (a, 0) and k = R(theta_i) (a, 0) on the
        # fast rotary pairs give a score sum_i a^2 cos((n + 1 - m) theta_i), highest at n = m - 1.
        att = model.model.layers[0].self_attn
        _clear_head(att, hd)
        fast = [i for i in range(half) if freqs[i] > 0.1]
        gap = sum(1 - math.cos(freqs[i]) for i in fast)  # score lost one position away
        a = math.sqrt(prev_logit * math.sqrt(hd) / gap)
        for i in fast:
            att.q_proj.weight[i, 0] = a / scale[0]
            att.k_proj.weight[i, 0] = a * math.cos(freqs[i]) / scale[0]
            att.k_proj.weight[i + half, 0] = a * math.sin(freqs[i]) / scale[0]
        att.v_proj.weight[:hd, E] = torch.eye(hd)
        att.o_proj.weight[P, :hd] = torch.eye(hd) / scale[0]

        # Layer 1, head 0: query = current code, key = previous-token code, on pairs that rotate by less
        # than half a radian over the whole context; value = the token's own code, written to O.
        att = model.model.layers[1].self_attn
        _clear_head(att, hd)
        slow = [i for i in range(half) if freqs[i] * max_pos < 0.5]
        if not slow:
            raise ValueError(f"rope_theta {theta:g} leaves no slowly rotating pair for a context of {max_pos}")
        dims = slow + [i + half for i in slow]
        proj = torch.linalg.qr(torch.randn(hd, hd, generator=gen))[0][: len(dims)]
        s = math.sqrt(match_logit * math.sqrt(hd) / (scale[1] ** 2 * len(dims) / hd))
        att.q_proj.weight[dims, E] = s * proj
        att.k_proj.weight[dims, P] = s * proj
        att.v_proj.weight[:hd, E] = torch.eye(hd)
        att.o_proj.weight[O, :hd] = torch.eye(hd) / scale[1]

        for layer in model.model.layers:  # quieter MLPs at the start, so they do not drown the circuit
            layer.mlp.down_proj.weight.mul_(0.1)
        head = model.lm_head.weight
        head[:, :used] = 0.0
        head[:, O] = code * out_logit / scale[2]
    return {"prev_token_pairs": len(fast), "match_pairs": len(slow), "prev_scale": round(a, 3),
            "match_scale": round(s, 3)}


def _clear_head(att, hd: int) -> None:
    att.q_proj.weight[:hd] = 0.0
    att.k_proj.weight[:hd] = 0.0
    att.v_proj.weight[:hd] = 0.0
    att.o_proj.weight[:, :hd] = 0.0
