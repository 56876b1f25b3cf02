"""vLLM on a GPU: serving through a LoRA adapter vs the merged model, and vLLM vs a transformers loop.

    python bench/vllm_gpu.py --prompts 512 --input-tokens 128 --output-tokens 128 --repeats 3

The model is the Qwen2.5-0.5B architecture with random bf16 weights (nothing can be downloaded), the
adapter a peft LoRA (r=16, all linear layers) with random A and B, and the merged model that adapter
folded into the base weights (peft ``merge_and_unload``), so all three compute the same function.
Each engine runs in its own process (vLLM claims GPU memory for its KV cache) and generates for the same
prompts (random token ids, equal length) with greedy decoding, every request forced to
``--output-tokens`` new tokens; one untimed warm-up call, then ``--repeats`` timed calls. Round i pairs
the i-th timed call of each engine; the ratios are per round, reported as median (min-max).
  vllm_lora     vllm.LLM(base, enable_lora) with every request through the adapter (LoRARequest)
  vllm_merged   vllm.LLM(merged)
  hf_generate   transformers generate on the merged model, batches of --hf-batch prompts
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

QWEN = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
            rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
            bos_token_id=151643, eos_token_id=151645)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(work: Path) -> tuple[Path, Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    base, adapter, merged = work / "qwen-base", work / "qwen-adapter", work / "qwen-merged"
    if (merged / "config.json").is_file():
        return base, adapter, merged
    spec = dict(QWEN)
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"))
    for name, p in peft_model.named_parameters():
        if "lora_" in name:  # peft starts B at zero: a no-op adapter would flatter the LoRA path
            torch.nn.init.normal_(p, std=0.02)
    peft_model.save_pretrained(adapter)
    peft_model.merge_and_unload().save_pretrained(merged)
    return base, adapter, merged


def prompts(n: int, length: int, vocab: int = 32000) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def run_engine(args) -> dict:
    work = Path(args.work)
    base, adapter, merged = work / "qwen-base", work / "qwen-adapter", work / "qwen-merged"
    ps = prompts(args.prompts, args.input_tokens)
    times: list[float] = []
    started = time.perf_counter()
    if args.engine == "hf_generate":
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
        model.generation_config.pad_token_id = 0
        ids = torch.tensor(ps, device="cuda")
        gen = dict(max_new_tokens=args.output_tokens, min_new_tokens=args.output_tokens, do_sample=False)

        def once(batch_rows):
            for i in range(0, len(batch_rows), args.hf_batch):
                model.generate(input_ids=batch_rows[i:i + args.hf_batch], **gen)
            torch.cuda.synchronize()

        startup = time.perf_counter() - started
        once(ids[: args.hf_batch])  # warm-up
        for _ in range(args.repeats):
            t = time.perf_counter()
            once(ids)
            times.append(time.perf_counter() - t)
    else:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        lora = args.engine == "vllm_lora"
        llm = LLM(model=str(base if lora else merged), skip_tokenizer_init=True, dtype="bfloat16", seed=0,
                  enable_lora=lora, max_lora_rank=16, max_loras=1, max_model_len=args.input_tokens +
                  args.output_tokens + 16, gpu_memory_utilization=args.gpu_memory_utilization)
        sp = SamplingParams(max_tokens=args.output_tokens, min_tokens=args.output_tokens, ignore_eos=True,
                            temperature=0.0, detokenize=False)
        req = LoRARequest("bench", 1, str(adapter)) if lora else None
        batch = [{"prompt_token_ids": p} for p in ps]
        startup = time.perf_counter() - started
        out = llm.generate(batch[:32], sp, lora_request=req, use_tqdm=False)  # warm-up
        assert all(len(o.outputs[0].token_ids) == args.output_tokens for o in out)
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = llm.generate(batch, sp, lora_request=req, use_tqdm=False)
            times.append(time.perf_counter() - t)
        assert sum(len(o.outputs[0].token_ids) for o in out) == args.prompts * args.output_tokens
    toks = args.prompts * args.output_tokens
    return {"engine": args.engine, "startup_s": round(startup, 1), "times_s": [round(t, 3) for t in times],
            "output_tokens_per_s": [round(toks / t, 1) for t in times]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--input-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--engines", default="vllm_lora,vllm_merged,hf_generate")
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--work", default="/tmp/loraflow-vllm")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    if args.engine:
        print("RESULT " + json.dumps(run_engine(args)), flush=True)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    build(work)
    res: dict[str, dict] = {}
    for engine in args.engines.split(","):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--engine", engine, *sys.argv[1:]], capture_output=True,
                              text=True)
        (work / f"{engine}.log").write_text(proc.stdout[-50_000:] + proc.stderr[-200_000:])
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{engine}: FAILED rc={proc.returncode}\n{proc.stderr[-4000:]}", flush=True)
            continue
        res[engine] = json.loads(line[7:])
        print(f"{engine}: {res[engine]['output_tokens_per_s']} output tok/s, startup {res[engine]['startup_s']}s "
              f"({time.perf_counter() - t:.0f}s)", flush=True)
    summary = {}
    for name, num, den in (("lora_over_merged", "vllm_lora", "vllm_merged"),
                           ("vllm_over_generate", "vllm_merged", "hf_generate")):
        if num in res and den in res:
            r = [a / b for a, b in zip(res[num]["output_tokens_per_s"], res[den]["output_tokens_per_s"])]
            summary[name] = {"per_round": [round(x, 3) for x in r], "median": round(statistics.median(r), 3),
                             "min": round(min(r), 3), "max": round(max(r), 3)}
            print(f"{name}: median {statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f}), rounds {summary[name]['per_round']}")
    Path(args.out, f"vllm_gpu{args.tag}.json").write_text(json.dumps({"args": vars(args), "engines": res,
                                                                      "ratios": summary}, indent=1))


if __name__ == "__main__":
    main()
