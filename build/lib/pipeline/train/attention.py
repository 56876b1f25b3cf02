"""Variable-length (padding-free) flash attention for packed training batches, on CUDA.

TRL's padding-free packing concatenates a micro-batch into one row and passes the document boundaries
as ``cu_seq_lens_q``/``cu_seq_lens_k``. With ``sdpa`` transformers turns them into a dense
block-diagonal ``(T, T)`` mask, so every layer computes attention over the whole packed row (about
``T / mean document length`` times the needed work) in a kernel that cannot skip masked blocks.
``varlen`` sends the same tensors to PyTorch's own varlen flash-attention kernel
(``torch.nn.attention.varlen``, torch >= 2.10), which attends inside each document only; no extra
package (flash-attn) is needed. Batches without boundaries (padded eval batches, generation) fall back
to ``sdpa`` unchanged.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

from pipeline.device import detect

NAME = "loraflow_varlen"


@lru_cache(maxsize=1)
def varlen_available() -> bool:
    """CUDA and a torch with ``torch.nn.attention.varlen``."""
    if not detect().is_cuda:
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=1)
def _varlen_call():
    """``varlen_attn`` and the causal/GQA keyword style of this torch version (it changed in 2.11-2.13)."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    return varlen_attn, causal, "enable_gqa" in params


def _boundaries(kwargs: dict, position_ids):
    """``(cu_seq_lens, max_len)`` of a packed row, from the collator or else from restarting position ids."""
    import torch

    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return cu.to(torch.int32), int(kwargs.get("max_length_q") or int(cu.diff().max()))
    if position_ids is None:
        return None, 0
    pos = position_ids[0]
    starts = (pos == 0).nonzero().flatten()
    if starts.numel() <= 1:
        return None, 0  # a single document: plain causal attention is the same thing
    cu = torch.cat([starts, torch.tensor([pos.numel()], device=pos.device)]).to(torch.int32)
    return cu, int(cu.diff().max())


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention function: ``query``/``key``/``value`` are ``(batch, heads, tokens, head_dim)``."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu, max_len = (None, 0)
    if query.shape[0] == 1 and attention_mask is None:
        cu, max_len = _boundaries(kwargs, kwargs.get("position_ids"))
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if dropout:
        raise ValueError("attention: varlen does not support attention dropout")
    varlen_attn, causal, native_gqa = _varlen_call()
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim)
    out_dtype = q.dtype
    if out_dtype not in (torch.float16, torch.bfloat16):
        # Models that keep norms in float32 (peft's k-bit preparation, _keep_in_fp32_modules) hand over
        # float32 q/k/v; the flash kernels take half precision only.
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        q, k, v = q.to(half), k.to(half), v.to(half)
    gqa = {}
    if k.shape[1] != q.shape[1]:
        if native_gqa:
            gqa = {"enable_gqa": True}
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, **causal, **gqa)
    return out.to(out_dtype).unsqueeze(0), None


def _mask(*args, attention_mask=None, **kwargs):
    # Packed rows carry their boundaries in cu_seq_lens, so no (T, T) mask is built for them; padded
    # batches still get sdpa's 4D mask for the fallback path.
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Make ``attn_implementation="loraflow_varlen"`` known to transformers; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME
