"""The fused LoRA path computes what peft computes: outputs, input gradients and adapter gradients."""

from __future__ import annotations

import pytest
import torch

from pipeline.train.fused_lora import fuse_lora_layers


def _tiny_llama(dtype=torch.float32, device="cpu", **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                               max_position_embeddings=256, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device)


def _peft(model, **kw):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", **kw))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would hide a wrong B path
            torch.nn.init.normal_(p, std=0.05)
    return model


def _copy_adapters(src, dst):
    """Same adapter weights in both (peft draws A at random; a 4-bit state dict does not round-trip)."""
    lora = {n: p for n, p in src.named_parameters() if "lora_" in n}
    for n, p in dst.named_parameters():
        if "lora_" in n:
            p.data.copy_(lora[n].data)
    assert len(lora) >= 28


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = model(inputs_embeds=emb, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), emb.grad.clone(), grads


def _assert_close(a, b, rtol):
    err = ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()
    assert err < rtol, err


def test_fused_equals_peft_float32():
    ids = torch.randint(0, 256, (3, 17))
    ref = _peft(_tiny_llama())
    fused = _peft(_tiny_llama())
    _copy_adapters(ref, fused)
    assert fuse_lora_layers(fused) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    l_ref, gx_ref, g_ref = _loss_and_grads(ref, ids)
    l_fused, gx_fused, g_fused = _loss_and_grads(fused, ids)
    assert torch.allclose(l_ref, l_fused, rtol=1e-5)
    _assert_close(gx_fused, gx_ref, 1e-5)
    assert g_ref.keys() == g_fused.keys() and len(g_ref) == 28
    for name in g_ref:
        _assert_close(g_fused[name], g_ref[name], 1e-5)


def test_fused_under_bf16_autocast_matches_peft():
    ids = torch.randint(0, 256, (2, 33))
    ref, fused = _peft(_tiny_llama()), _peft(_tiny_llama())
    _copy_adapters(ref, fused)
    fuse_lora_layers(fused)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l_ref, _, g_ref = _loss_and_grads(ref, ids)
        l_fused, _, g_fused = _loss_and_grads(fused, ids)
    assert abs(l_ref.item() - l_fused.item()) < 1e-2 * abs(l_ref.item())
    for name in g_ref:
        assert g_fused[name].dtype == torch.float32  # adapter weights keep their dtype
        _assert_close(g_fused[name], g_ref[name], 5e-2)


def test_disabled_adapters_dropout_and_dora_keep_peft_forward():
    ids = torch.randint(0, 256, (1, 9))
    model = _peft(_tiny_llama())
    fuse_lora_layers(model)
    with torch.no_grad():
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        base = _tiny_llama()(input_ids=ids).logits
        on = model(input_ids=ids).logits
    assert torch.allclose(off, base, atol=1e-6)  # DPO's reference model: the base alone
    assert not torch.allclose(on, base, atol=1e-3)

    for kw in ({"lora_dropout": 0.1}, {"use_dora": True}):
        ref = _peft(_tiny_llama(), **kw)
        fused = _peft(_tiny_llama(), **kw)
        _copy_adapters(ref, fused)
        fuse_lora_layers(fused)
        ref.eval(), fused.eval()
        with torch.no_grad():
            assert torch.allclose(ref(input_ids=ids).logits, fused(input_ids=ids).logits, atol=1e-6)


def test_trainable_base_bias_keeps_peft_forward():
    from pipeline.train.fused_lora import _fusable

    model = _peft(_tiny_llama(attention_bias=True), bias="all")
    fuse_lora_layers(model)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.get_base_layer().bias.requires_grad and _fusable(q) is None
    _, _, grads = _loss_and_grads(model, torch.randint(0, 256, (1, 9)))
    assert any(n.endswith("q_proj.base_layer.bias") for n in grads)  # the bias still trains


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_qlora_equals_peft_on_cuda():
    bnb = pytest.importorskip("bitsandbytes")
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with tempfile.TemporaryDirectory() as d:
        _tiny_llama(torch.bfloat16).save_pretrained(d)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        load = lambda: AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, quantization_config=quant,
                                                            device_map={"": 0})
        ref, fused = _peft(load()), _peft(load())
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in fused.modules())
    _copy_adapters(ref, fused)
    assert fuse_lora_layers(fused) == 14
    ids = torch.randint(0, 256, (2, 65), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        l_ref, gx_ref, g_ref = _loss_and_grads(ref, ids)
        l_fused, gx_fused, g_fused = _loss_and_grads(fused, ids)
    assert abs(l_ref.item() - l_fused.item()) < 1e-2 * abs(l_ref.item())
    _assert_close(gx_fused, gx_ref, 3e-2)
    for name in g_ref:
        _assert_close(g_fused[name], g_ref[name], 3e-2)
