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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_batch_packed_varlen_equals_padded_per_token_losses_and_lora_grads():
    """The training path itself: the same examples as TRL's padding-free packed row (varlen attention,
    position ids) and as a padded batch (sdpa + attention mask) give the same per-token losses and the same
    LoRA gradients, within bf16 tolerance. A wrong packing boundary would leak attention across examples
    and change both, which loss curves on random weights cannot show."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from pipeline.train import attention

    if not attention.varlen_available():
        pytest.skip("torch without torch.nn.attention.varlen")
    torch.manual_seed(1)
    lengths = [211, 37, 400, 5, 96, 150]
    examples = [{"input_ids": torch.randint(1, 512, (n,)).tolist()} for n in lengths]
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)

    def run(attn: str, batch: dict):
        model = get_peft_model(_tiny_qwen(attn), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                            init_lora_weights=False))
        batch = {k: v.cuda() for k, v in batch.items() if torch.is_tensor(v)}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        per_token = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                      ignore_index=-100, reduction="none").view(labels.shape[0], -1)
        mask = labels[:, 1:] != -100
        (per_token[mask].sum() / mask.sum()).backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        return per_token, mask, grads

    p_loss, p_mask, p_grads = run(attention.register(), packed)
    d_loss, d_mask, d_grads = run("sdpa", padded)
    # The packed row's valid positions, document by document, against each padded row's.
    assert int(p_mask.sum()) == int(d_mask.sum())
    packed_tokens = p_loss[p_mask]
    padded_tokens = torch.cat([d_loss[i][d_mask[i]] for i in range(len(lengths))])
    assert ((packed_tokens - padded_tokens).abs().max() / padded_tokens.abs().mean()).item() < 2e-2
    assert (packed_tokens - padded_tokens).abs().mean().item() < 5e-3 * padded_tokens.abs().mean().item()
    assert p_grads.keys() == d_grads.keys() and len(p_grads) > 0
    worst = max(((p_grads[k] - d_grads[k]).norm() / d_grads[k].norm()).item() for k in p_grads)
    assert worst < 3e-2, worst
