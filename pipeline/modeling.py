"""Loading the base model and tokenizer that every stage shares (train, evaluate, the champion re-score)."""

from __future__ import annotations

from pathlib import Path

from pipeline.device import detect


def load_base(base_dir: Path, quantize_4bit: bool = False, attn_implementation: str = "sdpa"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = detect()
    dtype = torch.bfloat16 if dev.bf16 else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    kwargs: dict = {"dtype": dtype}
    if quantize_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise RuntimeError("train.adapter: qlora needs bitsandbytes (pip install 'loraflow[gpu]')") from None
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        if dev.is_cuda:
            # A 4-bit model is quantized where it is loaded and cannot be moved afterwards: under torchrun
            # each rank loads its copy straight onto its own GPU.
            import os

            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    kwargs["attn_implementation"] = attn_implementation
    # No peft.prepare_model_for_kbit_training for QLoRA: it upcasts every non-quantized weight (norms and
    # the tied embedding/LM head) to float32, which made 4-bit Llama-3.2-1B use more memory than bf16 LoRA
    # (docs/benchmarks.md); bf16 norms are what bf16 LoRA trains with anyway, and peft freezes the base.
    return AutoModelForCausalLM.from_pretrained(base_dir, **kwargs), tokenizer
