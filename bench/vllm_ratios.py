"""vLLM serving ratios on the CPU build (the fallback issue 12 names when the CUDA build cannot be carried).

    .venv/bin/python bench/vllm_ratios.py [--prompts 32] [--tokens 48] [--rounds 3]

1. LoRA vs merged: one vLLM server whose model is the merged checkpoint (base + adapter folded in) with
   LoRA enabled and the same adapter loaded; requests for the served base name run the merged weights,
   requests for the adapter name add the LoRA computation. Same prompts, same forced output length
   (``ignore_eos``), alternating in each round: the ratio is adapter tokens/s over merged tokens/s.
2. vLLM vs a transformers ``generate`` loop on the merged model: the same prompts and output length, greedy,
   batched like the evaluate stage (batch 16), alternating with the vLLM run in each round.
Models: the builtin base (no pretraining: speed does not depend on the weights) and a LoRA r=16 adapter
on all linear layers. Prints per-round numbers and the medians with their spread, as JSON too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.gateway_overhead import demo_setup, free_port  # noqa: E402
from pipeline.config import ServeConfig, TrainConfig  # noqa: E402
from pipeline.io import load_chat_file  # noqa: E402
from pipeline.serve.vllm import VLLMServer  # noqa: E402
from pipeline.train.trainer import train  # noqa: E402


def vllm_rate(server: VLLMServer, model: str, prompts: list[list[dict]], tokens: int, concurrency: int) -> float:
    def one(messages):
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=600, headers=server._auth, json={
            "model": model, "messages": messages, "max_tokens": tokens, "temperature": 0.0, "ignore_eos": True})
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        n = sum(pool.map(one, prompts))
    return n / (time.perf_counter() - started)


def hf_rate(model, tok, prompts: list[list[dict]], tokens: int, batch: int = 16) -> float:
    import torch

    tok.padding_side = "left"
    n, started = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts[i:i + batch]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        n += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    return n / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    tmp, base = demo_setup("loraflow-vllm-ratios-")
    adapter = tmp / "adapter"
    train(TrainConfig(out_dir=str(adapter), checkpoint_dir=str(tmp / "ck"), lora_r=16, lora_alpha=32, trl=dict(max_steps=4, per_device_train_batch_size=8)), base, tmp / "train/clean.jsonl")
    from peft import PeftModel

    from pipeline.modeling import load_base

    model, tok = load_base(base)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(tmp / "merged", safe_serialization=True)
    tok.save_pretrained(tmp / "merged")
    prompts = [r["prompt"] for r in load_chat_file(tmp / "eval/clean.jsonl")[: args.prompts]]

    cfg = ServeConfig(port=free_port(), log_file=str(tmp / "vllm.log"), python=str(ROOT / ".venv-vllm/bin/python"))
    server = VLLMServer.start(cfg, tmp / "merged", api_key="bench")
    rounds = []
    try:
        server.wait_ready(progress=print)
        server.load_adapter("adapter", adapter)
        vllm_rate(server, "base", prompts[:4], 8, 4)  # warm-up: first requests compile and allocate
        vllm_rate(server, "adapter", prompts[:4], 8, 4)
        for i in range(args.rounds):
            order = ["adapter", "base"] if i % 2 == 0 else ["base", "adapter"]
            rates = {m: vllm_rate(server, m, prompts, args.tokens, args.concurrency) for m in order}
            hf_first = i % 2 == 1
            hf = hf_rate(merged, tok, prompts, args.tokens) if hf_first else None
            v_merged = vllm_rate(server, "base", prompts, args.tokens, args.concurrency)
            hf = hf if hf is not None else hf_rate(merged, tok, prompts, args.tokens)
            r = {"round": i, "vllm_lora_tok_s": round(rates["adapter"], 1), "vllm_merged_tok_s": round(rates["base"], 1),
                 "lora_over_merged": round(rates["adapter"] / rates["base"], 3), "vllm_merged_again_tok_s": round(v_merged, 1),
                 "hf_generate_tok_s": round(hf, 1), "vllm_over_hf": round(v_merged / hf, 2)}
            rounds.append(r)
            print(json.dumps(r), flush=True)
    finally:
        server.stop()
    med = statistics.median
    lo = [r["lora_over_merged"] for r in rounds]
    vh = [r["vllm_over_hf"] for r in rounds]
    print(json.dumps({"rounds": rounds, "lora_over_merged": {"median": med(lo), "min": min(lo), "max": max(lo)},
                      "vllm_over_hf_generate": {"median": med(vh), "min": min(vh), "max": max(vh)},
                      "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
