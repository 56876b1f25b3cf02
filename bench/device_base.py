"""A real-architecture base model for the GPU loop where no hub can be reached (the lent device):
Qwen2.5-0.5B's or Llama-3.2-1B's shape and architecture, the project's own BPE tokenizer (with its chat
template) trained on the demo data, weights self-pretrained here on the GPU with the builtin base's own
pretraining (pipeline/base/builtin.py). Saved as a plain Hugging Face folder (safetensors), which
``base.model`` then names like any downloaded model.

    python3 bench/device_base.py --shape qwen2.5-0.5b --out /tmp/models/qwen2.5-0.5b-shaped --steps 300
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    # The published configs' shapes (hidden, intermediate, layers, heads, KV heads, tied embeddings).
    "qwen2.5-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    # The same architecture at a size a CPU builds in seconds: a smoke run of the GPU profile's paths.
    "qwen2-tiny": dict(arch="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True),
    "llama-3.2-1b": dict(arch="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from pipeline.base.builtin import PretrainDocs, _answers, _conversations, build_tokenizer, pretrain
    from pipeline.config import BuiltinBaseConfig, SanitizeConfig
    from pipeline.data.sanitize import sanitize_files

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="device-base-"))
    # Pretraining sees the sanitized training prompts and, as separate documents, their answers (as the
    # builtin base does), never the two paired: the adapter still has the task to learn.
    sanitize_files([ROOT / "data/raw/tickets_train.jsonl"], tmp / "train", SanitizeConfig())
    sanitize_files([ROOT / "data/raw/generic_chat.jsonl"], tmp / "generic", SanitizeConfig())
    train, chat = tmp / "train/clean.jsonl", tmp / "generic/clean.jsonl"
    cfg = BuiltinBaseConfig(vocab_size=args.vocab, pretrain_steps=args.steps, pretrain_batch_size=32,
                            pretrain_seq_len=256, pretrain_lr=1e-3, copy_circuit=False, output_scale=1.0,
                            max_position_embeddings=4096)
    tokenizer = build_tokenizer(cfg, [train, chat])
    shape = dict(SHAPES[args.shape])
    arch = shape.pop("arch")
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    torch.manual_seed(0)
    config = config_cls(vocab_size=len(tokenizer), max_position_embeddings=4096, rope_theta=1e6,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **shape)
    model = model_cls(config).to(args.device)
    params = sum(p.numel() for p in model.parameters())
    print(f"device-base: {args.shape} ({arch}), {params / 1e6:.0f}M parameters, vocab {len(tokenizer)}", flush=True)
    docs = PretrainDocs(_conversations([train], prompts_only=True) + _conversations([chat]), _answers([train]))
    report = pretrain(model, tokenizer, docs, cfg, progress=lambda s: print(s, flush=True))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(args.out)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    report.pop("loss_curve", None)
    summary = {"shape": args.shape, "parameters": params, "vocab": len(tokenizer), **report,
               "seconds_total": round(time.perf_counter() - started, 1), "device": torch.cuda.get_device_name(0) if args.device == "cuda" else args.device}
    (out / "device_base.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
