"""GPU training throughput: loraflow's train stage in several configurations against a plain baseline.

    python bench/train_gpu.py --model qwen2.5-0.5b --variants baseline,packed,packed_liger --steps 40

No weights can be downloaded, so each model is the real architecture (Qwen2.5-0.5B or Llama-3.2-1B
config) with random bf16 weights, and the tokenizer is the project's own BPE (token ids only feed the
embedding; speed does not depend on which ids they are). The data are chat records whose lengths follow
a log-normal distribution (median ~350 tokens, clipped to 32..max_length), like real SFT sets.

Every variant runs in its own process with the same model, data, max length and tokens per optimizer
step as the baseline:
  baseline      a hand-written TRL script: SFTTrainer + peft LoRA with TRL's defaults (padded batches,
                gradient checkpointing), micro-batch 8 x accumulation 4
  packed_sdpa   loraflow's train stage: best-fit packing, padding-free, sdpa (dense block-diagonal mask)
  packed        + varlen flash attention within each packed document (train.attention: auto)
  packed_liger  + Liger RMSNorm/RoPE/SwiGLU kernels; _a1/_a2: fewer, larger micro-batches
  ...           see VARIANTS
Throughput is steady state: whole optimizer steps after --warmup (step end to step end, device synchronised:
data loading and collation included). Every figure is the median of --repeats paired rounds; each round
runs the baseline and then every variant, each in its own process, and ratios are against that round's
baseline; the spread (min-max) is printed with the median.
Reported: non-padding tokens/s, peak CUDA memory, MFU = 4 * N * tokens/s / 989e12 (LoRA: forward 2N,
backward 2N, no weight gradients; N = parameters, H100 dense bf16 peak), ratios against the baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

H100_BF16_PEAK = 989e12

MODELS = {
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, hidden_act="silu"),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, hidden_act="silu", head_dim=64,
                         rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, hidden_act="silu", head_dim=128,
                         rope_scaling={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
}

# Every variant sees about the same tokens per optimizer step as the baseline (EFFECTIVE padded rows =
# micro-batch 8 x accumulation 4). Packed variants hold max_length-token rows, so their rows per step are
# scaled by mean example length / max_length; "accum" sets how those rows split into micro-batches.
_PADDED = dict(gradient_checkpointing=True, attention="sdpa")
_PACKED = dict(gradient_checkpointing=True, packing=True, attention="varlen")
_LIGER = dict(_PACKED, liger_kernels=True)
_Q5X3 = dict(_LIGER, adapter="qlora", accum=3)  # the configuration that meets the speed and memory targets
VARIANTS = {
    "baseline": _PADDED,
    # Plain TRL QLoRA, the usual recipe: BitsAndBytesConfig NF4 + prepare_model_for_kbit_training.
    "baseline_qlora": dict(_PADDED, adapter="qlora"),
    "baseline_mb32": dict(_PADDED, batch_size=32),
    # Plain TRL with its own speed switches (a tuned hand-written script): packing, Liger, bf16 LoRA or
    # QLoRA, one accumulation step (the fastest shape on a host-bound step) at the baseline's tokens per
    # optimizer step. Packing is TRL's "wrapped" strategy: its default best-fit packing turns padding-free
    # on, which flattens a micro-batch into one sequence; with sdpa (flash-attn is not on the device) that
    # is attention over all of its tokens, 0.6x the defaults baseline on the H200 (2026-12-03).
    "baseline_tuned": dict(packing=True, accum=1),
    "baseline_qlora_tuned": dict(packing=True, accum=1, adapter="qlora"),
    "no_gc": dict(_PADDED, gradient_checkpointing=False),
    "packed_sdpa": dict(_PACKED, attention="sdpa"),
    "packed": _PACKED,
    "packed_a1": dict(_PACKED, accum=1),
    "packed_a2": dict(_PACKED, accum=2),
    "packed_liger": _LIGER,
    "packed_liger_a1": dict(_LIGER, accum=1),
    "packed_liger_a2": dict(_LIGER, accum=2),
    "packed_liger_nogc": dict(_LIGER, gradient_checkpointing=False),
    "packed_liger_compile": dict(_LIGER, torch_compile=True),
    "packed_liger_a2_compile": dict(_LIGER, accum=2, torch_compile=True),
    "qlora": dict(_PADDED, adapter="qlora"),
    "qlora_packed_liger_a2": dict(_LIGER, adapter="qlora", accum=2),
    "qlora_packed_a2": dict(_PACKED, adapter="qlora", accum=2),
    "qlora_packed_liger": dict(_LIGER, adapter="qlora"),
    "qlora_packed_liger_a3": _Q5X3,
    # One lever at a time on 5 x 3:
    "qlora_packed_liger_a3_compile": dict(_Q5X3, torch_compile=True),
    "qlora_packed_liger_a3_nogc": dict(_Q5X3, gradient_checkpointing=False),
    "packed_liger_a3": dict(_LIGER, accum=3),  # bf16 LoRA: the 4-bit share
    "qlora_packed_liger_a3_fused": dict(_Q5X3, fused_lora=True),
    # collation in worker processes (pinned, non-blocking copies)
    "qlora_packed_liger_a3_workers": dict(_Q5X3, dataloader_workers=2),
    "qlora_packed_liger_a2_fused": dict(_LIGER, adapter="qlora", accum=2, fused_lora=True),
    "packed_liger_a3_fused": dict(_LIGER, accum=3, fused_lora=True),
    "qlora_packed_liger_a1": dict(_LIGER, adapter="qlora", accum=1),
    # Host overhead per micro-batch: the 5 x 3 step's rows in one micro-batch (15 x 1), fused LoRA.
    "qlora_packed_liger_a1_fused": dict(_LIGER, adapter="qlora", accum=1, fused_lora=True),
    # Activation offloading to host memory instead of recomputation (TRL's activation_offloading).
    "qlora_packed_liger_a3_fused_offload": dict(_Q5X3, fused_lora=True, gradient_checkpointing=False,
                                                activation_offloading=True),
}


def build_model(name: str, out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.base.builtin import build_tokenizer
    from pipeline.config import BuiltinBaseConfig

    if (out / "config.json").is_file():
        return out
    tok = build_tokenizer(BuiltinBaseConfig(vocab_size=2048, max_position_embeddings=4096),
                          [ROOT / "data/raw/tickets_train.jsonl"])
    spec = dict(MODELS[name])
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id, bos_token_id=None, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    torch.cuda.empty_cache()  # a caller that goes on to measure memory must not hold the weights
    return out


def build_data(path: Path, rows: int, max_tokens: int, seed: int = 0) -> Path:
    if path.is_file():
        return path
    rng = random.Random(seed)
    words = (ROOT / "data/raw/tickets_train.jsonl").read_text().split()
    with open(path, "w") as fh:
        for _ in range(rows):
            n = int(min(max(math.exp(rng.gauss(math.log(250), 0.8)), 24), max_tokens * 0.55))
            m = int(min(max(math.exp(rng.gauss(math.log(60), 0.7)), 8), max_tokens * 0.2))
            fh.write(json.dumps({"messages": [
                {"role": "user", "content": " ".join(rng.choices(words, k=n))},
                {"role": "assistant", "content": " ".join(rng.choices(words, k=m))}]}) + "\n")
    return path


class StepTimer:
    """Whole optimizer steps, end to end: the time between consecutive step ends (device synchronised), so
    data loading, collation, the optimizer, logging and callbacks are all inside; tokens per step."""

    def __init__(self, profile_dir: Path | None = None, profile_at: int = 0) -> None:
        import torch
        from transformers import TrainerCallback

        self.steps: list[tuple[float, int]] = []  # (seconds, tokens) per step
        timer = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                torch.cuda.synchronize()
                timer._t, timer._n = time.perf_counter(), state.num_input_tokens_seen

            def on_step_begin(self, args, state, control, **kw):
                if profile_dir and state.global_step == profile_at:
                    timer._prof = torch.profiler.profile(
                        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                    timer._prof.__enter__()
                    timer._prof_t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                torch.cuda.synchronize()
                now = time.perf_counter()
                timer.steps.append((now - timer._t, state.num_input_tokens_seen - timer._n))
                timer._t, timer._n = now, state.num_input_tokens_seen
                if profile_dir and state.global_step == profile_at + 2:
                    timer._prof.__exit__(None, None, None)
                    timer.profile_summary = _summarise(timer._prof, time.perf_counter() - timer._prof_t, profile_dir)

        self.callback = _CB()

    def steady(self, skip: int) -> dict:
        tail = self.steps[skip:] or self.steps
        secs, toks = sum(s for s, _ in tail), sum(n for _, n in tail)
        return {"steady_tokens_per_s": round(toks / secs, 1), "steady_step_s": round(secs / len(tail), 4),
                "steady_steps": len(tail)}


# Kernel-name patterns -> what the GPU time was spent on (first match wins).
KERNEL_CLASSES = [
    ("dequantize (bitsandbytes)", ("dequant",)),
    ("attention", ("flash", "fmha", "varlen")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "splitk")),
    ("memcpy/memset", ("memcpy", "memset")),
    ("elementwise/reduce", ("elementwise", "vectorized", "reduce", "catarray", "index", "fill")),
    ("Triton (Liger)", ("triton", "_rms", "_rope", "swiglu", "liger", "cross_entropy")),
]
# Host-side events whose time is the host waiting or feeding the GPU.
HOST_EVENTS = {
    "sync waits (.item(), D2H)": ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
                                  "cudaMemcpyAsync"),
    "data loading + collation": ("dataloader", "__next__"),
    "optimizer step": ("optimizer.step",),
}


def _summarise(prof, wall: float, out_dir: Path) -> dict:
    """Where the profiled steps went: GPU busy share, kernel time by class, host waits, launches."""
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    kernel_us = sum(e.self_device_time_total for e in kernels)
    by_class: dict[str, float] = {}
    for e in kernels:
        name = e.key.lower()
        cls = next((c for c, pats in KERNEL_CLASSES if any(p in name for p in pats)), "other")
        by_class[cls] = by_class.get(cls, 0.0) + e.self_device_time_total / 1e6
    host: dict[str, float] = {}
    for label, pats in HOST_EVENTS.items():
        # self time for the waits; total time (children included) for the Python-level events
        host[label] = round(sum((e.self_cpu_time_total if label.startswith("sync") else e.cpu_time_total) / 1e6
                                for e in events if e.device_type.name == "CPU"
                                and any(p.lower() in e.key.lower() for p in pats)), 3)
    table = events.table(sort_by="self_device_time_total", row_limit=40)
    cpu_table = events.table(sort_by="self_cpu_time_total", row_limit=30)
    (out_dir / "profile.txt").write_text(table + "\n\n" + cpu_table)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    return {"profiled_wall_s": round(wall, 3), "gpu_kernel_s": round(kernel_us / 1e6, 3),
            "gpu_busy": round(kernel_us / 1e6 / wall, 3), "kernel_launches": launches,
            "kernel_s_by_class": {k: round(v, 3) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
            "host_s": host}


def run_plain_trl(args, base: Path, data: Path, timer: StepTimer) -> dict:
    """The baseline: a hand-written TRL script (SFTTrainer + peft LoRA, TRL's defaults, padded batches)."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    if args.variant in ("baseline_qlora", "baseline_qlora_tuned"):
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                     quantization_config=quant, device_map={"": 0})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(base)
    ds = load_dataset("json", data_files=str(data), split="train")
    ds = ds.map(lambda r: {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}, remove_columns=["messages"])
    sft = SFTConfig(output_dir=str(Path(args.work) / "out" / args.variant), max_steps=args.steps,
                    per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=args.accum,
                    learning_rate=1e-4, max_length=args.max_length, bf16=True, logging_steps=1, save_strategy="no",
                    report_to="none", seed=0, include_num_input_tokens_seen="non_padding",
                    **({"packing": True, "packing_strategy": "wrapped", "use_liger_kernel": True}
                       if args.variant.endswith("_tuned") else {}))
    trainer = SFTTrainer(model=model, args=sft, train_dataset=ds, processing_class=tok, callbacks=[timer.callback],
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    duration = time.perf_counter() - started
    tokens = int(trainer.state.num_input_tokens_seen)
    return {"steps": trainer.state.global_step, "tokens_seen": tokens, "tokens_per_s": tokens / duration,
            "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
            "gradient_checkpointing": sft.gradient_checkpointing,
            "loss_curve": [{"step": r["step"], "loss": r["loss"]} for r in trainer.state.log_history if "loss" in r]}


def run_one(args) -> dict:
    import torch

    from pipeline.train.trainer import train

    work = Path(args.work)
    base = build_model(args.model, work / args.model)
    data = build_data(work / "data.jsonl", args.rows, args.max_length)
    prof_dir = Path(args.out) / f"profile_{args.variant}" if args.profile else None
    if prof_dir:
        prof_dir.mkdir(parents=True, exist_ok=True)
    timer = StepTimer(prof_dir, profile_at=args.warmup)
    if args.variant in ("baseline", "baseline_qlora"):
        m = run_plain_trl(args, base, data, timer)
        micro, accum = args.micro_batch, args.accum
    elif args.variant.endswith("_tuned"):
        tokens = args.tokens_per_step or args.micro_batch * args.accum * _mean_tokens(base, data)
        args.accum = 1
        args.micro_batch = micro = max(1, round(tokens / (0.99 * args.max_length)))
        accum = 1
        m = run_plain_trl(args, base, data, timer)
    else:
        tokens = args.tokens_per_step or args.micro_batch * args.accum * _mean_tokens(base, data)
        cfg = stage_config(args, tokens, work)
        micro, accum = cfg.trl["per_device_train_batch_size"], cfg.trl["gradient_accumulation_steps"]
        m = train(cfg, base, data, None, extra_callbacks=[timer.callback])
    n_params = sum(p.numel() for p in torch.nn.Module.parameters(_load_meta(base)))
    m.update(timer.steady(args.warmup))
    m["profile"] = getattr(timer, "profile_summary", None)
    m["n_params"] = n_params
    m["mfu"] = 4 * n_params * m["steady_tokens_per_s"] / H100_BF16_PEAK
    m["variant"] = args.variant
    m["micro_batch"] = micro
    m["grad_accum"] = accum
    m["tokens_per_step"] = m["tokens_seen"] / max(m["steps"], 1)
    m["step_times"] = [round(s, 4) for s, _ in timer.steps]
    return m


def stage_config(args, tokens_per_step: float, work: Path):
    """The train stage's config for ``args.variant``, at the baseline's tokens per optimizer step."""
    from pipeline.config import TrainConfig

    opts = dict(VARIANTS[args.variant])
    micro = opts.pop("batch_size", args.micro_batch)
    accum = opts.pop("accum", None)
    # Settings TRL has of its own live under train.trl (the stage passes them through).
    moved = {"liger_kernels": "use_liger_kernel", "gradient_checkpointing": "activation_checkpointing",
             "dataloader_workers": "dataloader_num_workers", "torch_compile": "torch_compile",
             "activation_offloading": "activation_offloading"}
    trl_opts = {moved[k]: opts.pop(k) for k in list(opts) if k in moved}
    if opts.get("packing"):
        # A packed row holds up to max_length tokens: keep the tokens per optimizer step equal to the
        # baseline's (measured by its run when it ran first, else estimated from the data).
        accum = accum or args.accum
        micro = max(1, round(tokens_per_step / (0.99 * args.max_length) / accum))
    else:
        accum = accum or max(1, args.micro_batch * args.accum // micro)
    # The plain-TRL baseline truncates the longest records silently; the stage refuses more than 5% cut
    # unless told: the same data for every variant.
    return TrainConfig(out_dir=str(work / "out" / args.variant), checkpoint_dir=str(work / "ckpt"), lora_r=16,
                       lora_alpha=32, max_truncated_share=1.0, **opts,
                       trl=dict(**trl_opts, max_steps=args.steps, per_device_train_batch_size=micro,
                                gradient_accumulation_steps=accum, max_length=args.max_length, learning_rate=1e-4,
                                logging_steps=1, save_steps=10_000, warmup_steps=0.0))


def _mean_tokens(base: Path, data: Path, sample: int = 400) -> float:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    lengths = []
    with open(data) as fh:
        for _, line in zip(range(sample), fh):
            text = tok.apply_chat_template(json.loads(line)["messages"], tokenize=False)
            lengths.append(len(tok(text, add_special_tokens=False).input_ids))
    return sum(lengths) / len(lengths)


def _load_meta(base: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b", choices=sorted(MODELS))
    ap.add_argument("--variants", default="baseline,packed,packed_liger")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the steady-state throughput")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler over two steps after the warm-up (slows them: not for the tables)")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--tokens-per-step", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3, help="paired rounds: baseline + every variant, interleaved")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--no-baseline", action="store_true",
                    help="absolute figures only (MFU, memory): no baseline run, so no ratios (a large model's "
                         "plain-TRL baseline costs more device time than every variant together)")
    ap.add_argument("--work", default="/tmp/loraflow-bench")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    variants = args.variants.split(",")
    if not variants[0].startswith("baseline") and not args.no_baseline:
        variants.insert(0, "baseline")
    runs: list[dict] = []  # every run, in order; repeats are interleaved: B v1 v2 .. B v1 v2 ..
    for rep in range(args.repeats):
        baseline = None
        for v in variants:
            t = time.perf_counter()
            extra = ["--tokens-per-step", str(baseline["tokens_per_step"])] if baseline else []
            proc = subprocess.run([sys.executable, __file__, "--variant", v, *extra, *sys.argv[1:]],
                                  capture_output=True, text=True)
            logs = Path(args.work) / "logs"  # the device tool returns few files: logs stay there
            logs.mkdir(parents=True, exist_ok=True)
            (logs / f"{v}_r{rep}.log").write_text(proc.stderr[-100_000:])
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(f"r{rep} {v}: FAILED after {time.perf_counter() - t:.0f}s\n{proc.stderr[-2500:]}", flush=True)
                continue
            r = json.loads(line[7:])
            r["repeat"] = rep
            if v == variants[0] and not args.no_baseline:  # the first variant of a round is its baseline
                baseline = r
            if baseline:
                r["speedup"] = r["steady_tokens_per_s"] / baseline["steady_tokens_per_s"]
                r["memory_ratio"] = r["peak_memory_mb"] / baseline["peak_memory_mb"]
            runs.append(r)
            Path(args.out, f"train_gpu_{args.model}{args.tag}.json").write_text(json.dumps(
                {"args": vars(args), "runs": runs}, indent=1))
            print(f"r{rep} {v}: {r['steady_tokens_per_s']:.0f} tok/s ({r.get('speedup', float('nan')):.2f}x), step "
                  f"{r['steady_step_s']:.3f}s, peak {r['peak_memory_mb']:.0f} MB ({r.get('memory_ratio', float('nan')):.2f}x), "
                  f"MFU {r['mfu']:.3f}, loss {_tail_loss(r):.3f}, {r['micro_batch']} x {r['grad_accum']}, "
                  f"{r['tokens_per_step']:.0f} tok/step ({time.perf_counter() - t:.0f}s)", flush=True)
    print("\n| model | variant | micro x accum | tokens/s median | x baseline: median (min-max), n | peak MB | "
          "x baseline | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        if not rs:
            continue
        med = statistics.median
        sp = [r["speedup"] for r in rs if "speedup" in r]
        ratio = f"{med(sp):.2f} ({min(sp):.2f}-{max(sp):.2f}), {len(sp)}" if sp else f"- (no baseline), {len(rs)}"
        mem = f"{med(r['memory_ratio'] for r in rs):.2f}" if sp else "-"
        print(f"| {args.model} | {v} | {rs[0]['micro_batch']} x {rs[0]['grad_accum']} | "
              f"{med(r['steady_tokens_per_s'] for r in rs):,.0f} | {ratio} | "
              f"{med(r['peak_memory_mb'] for r in rs):,.0f} | {mem} | {med(r['mfu'] for r in rs):.3f} |")


def _tail_loss(r: dict, n: int = 5) -> float:
    curve = [p["loss"] for p in r.get("loss_curve", [])][-n:]
    return sum(curve) / len(curve) if curve else float("nan")


if __name__ == "__main__":
    main()
