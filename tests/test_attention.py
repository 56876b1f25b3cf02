"""Padding-free varlen attention: chosen only where it can run, and on CUDA equal to attending per document."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.train.trainer import attention_implementation


def test_cpu_resolves_to_sdpa_and_rejects_varlen():
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    assert attention_implementation(TrainConfig(packing=True)) == "sdpa"
    assert attention_implementation(TrainConfig(attention="eager")) == "eager"
    with pytest.raises(ValueError, match="train.attention: varlen needs CUDA"):
        attention_implementation(TrainConfig(attention="varlen"))


def _tiny_qwen(attn: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                               max_position_embeddings=1024)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.bfloat16).cuda()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_varlen_packed_row_equals_separate_documents():
    from pipeline.train import attention

    if not attention.varlen_available():
        pytest.skip("torch without torch.nn.attention.varlen")
    lengths = [37, 301, 5, 170]
    docs = [torch.randint(0, 512, (n,), device="cuda") for n in lengths]
    packed = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(n, device="cuda") for n in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")

    ref_model = _tiny_qwen("sdpa")
    ref = torch.cat([ref_model(input_ids=d[None]).logits[0].float() for d in docs])
    model = _tiny_qwen(attention.register())
    out = model(input_ids=packed, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                max_length_q=max(lengths), max_length_k=max(lengths)).logits[0].float()
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2  # bf16 operands

    # Boundaries recovered from position_ids alone give the same result.
    out2 = model(input_ids=packed, position_ids=position_ids).logits[0].float()
    assert ((out2 - out).norm() / out.norm()).item() < 1e-3

    # Gradients agree with the per-document reference.
    loss = model(input_ids=packed, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                 max_length_q=max(lengths), max_length_k=max(lengths)).logits.float().logsumexp(-1).sum()
    loss.backward()
    ref_loss = sum(ref_model(input_ids=d[None]).logits.float().logsumexp(-1).sum() for d in docs)
    ref_loss.backward()
    g = model.model.layers[0].self_attn.q_proj.weight.grad.float()
    g_ref = ref_model.model.layers[0].self_attn.q_proj.weight.grad.float()
    assert ((g - g_ref).norm() / g_ref.norm()).item() < 3e-2

    # No attention across documents: changing the first document leaves the others unchanged.
    other = packed.clone()
    other[0, : lengths[0]] = torch.randint(0, 512, (lengths[0],), device="cuda")
    with torch.no_grad():
        a = model(input_ids=packed, position_ids=position_ids).logits[0, lengths[0]:]
        b = model(input_ids=other, position_ids=position_ids).logits[0, lengths[0]:]
    assert torch.equal(a, b)
