"""The longest training sequence that fits: plain TRL QLoRA against loraflow's QLoRA train stage.

    python bench/max_seq_gpu.py --model llama-3.1-8b --lengths 8192,16384,32768,65536,98304,131072

Each variant runs in its own process over one dataset of single-example batches of growing length
(micro-batch 1, no accumulation, gradient checkpointing, visited in order), so every optimizer step is
one sequence of a known length; the peak CUDA memory of each step is recorded and the first step that
runs out of memory ends the variant. Random weights (no download); the lengths are token counts after
the chat template, as trained.
  baseline_qlora       a hand-written TRL script: BitsAndBytesConfig NF4 + prepare_model_for_kbit_training,
                       sdpa attention (bench/train_gpu.py's baseline_qlora)
  qlora_liger          loraflow's train stage: 4-bit base without the float32 upcast, Liger kernels
  qlora_liger_fused    + the fused LoRA path
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_gpu  # noqa: E402  (bench/train_gpu.py: models, baseline script)

VARIANTS = {
    "qlora_liger": dict(adapter="qlora", liger_kernels=True),
    "qlora_liger_fused": dict(adapter="qlora", liger_kernels=True, fused_lora=True),
}


def build_rows(path: Path, base: Path, lengths: list[int]) -> list[int]:
    """One chat example per target length (tokens after the chat template); returns the actual lengths."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    words = (train_gpu.ROOT / "data/raw/tickets_train.jsonl").read_text().split()
    rng = random.Random(0)
    per_word = None
    actual = []
    with open(path, "w") as fh:
        for target in lengths:
            n = target // 2 if per_word is None else int(target / per_word)
            for _ in range(4):  # refine the word count to land just under the target
                msgs = [{"role": "user", "content": " ".join(rng.choices(words, k=n))},
                        {"role": "assistant", "content": " ".join(rng.choices(words, k=32))}]
                got = len(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
                per_word = got / n
                if 0.97 * target <= got <= target:
                    break
                n = int(n * target / got * 0.99)
            actual.append(got)
            fh.write(json.dumps({"messages": msgs}) + "\n")
    return actual


def run_variant(args) -> dict:
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback

    # In order, one example per step: step i is the i-th length.
    Trainer._get_train_sampler = lambda self, train_dataset=None: SequentialSampler(train_dataset or self.train_dataset)
    work = Path(args.work)
    base = train_gpu.build_model(args.model, work / args.model)
    data = work / "maxseq.jsonl"
    lengths = json.loads((work / "maxseq_lengths.json").read_text())
    steps: list[dict] = []

    class _Peak(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            torch.cuda.synchronize()
            i = state.global_step - 1
            steps.append({"tokens": lengths[i], "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20),
                          "step_s": round(time.perf_counter() - self.t, 2)})
            print(f"{args.variant}: {lengths[i]} tokens fit, peak {steps[-1]['peak_memory_mb']} MB", flush=True)

    error = None
    try:
        if args.variant == "baseline_qlora":
            timer = train_gpu.StepTimer()
            timer.callback = _Peak()
            ns = argparse.Namespace(variant="baseline_qlora", work=args.work, steps=len(lengths), micro_batch=1, accum=1,
                                    max_length=max(lengths) + 8)
            train_gpu.run_plain_trl(ns, base, data, timer)
        else:
            from pipeline.config import TrainConfig
            from pipeline.train.trainer import train

            cfg = TrainConfig(out_dir=str(work / "out" / args.variant), checkpoint_dir=str(work / "ckpt"), lora_r=16, lora_alpha=32, **VARIANTS[args.variant], trl=dict(max_steps=len(lengths), per_device_train_batch_size=1, gradient_accumulation_steps=1, max_length=max(lengths) + 8, learning_rate=1e-4, logging_steps=1, save_steps=10_000, warmup_steps=0.0, gradient_checkpointing=True))
            train(cfg, base, data, None, extra_callbacks=[_Peak()])
    except torch.OutOfMemoryError as e:
        error = "out of memory: " + str(e).split("\n")[0][:200]
    fitted = [s["tokens"] for s in steps]
    return {"variant": args.variant, "steps": steps, "longest_fit": max(fitted) if fitted else 0,
            "first_failure": lengths[len(steps)] if len(steps) < len(lengths) else None, "error": error}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b", choices=sorted(train_gpu.MODELS))
    ap.add_argument("--lengths", default="8192,16384,32768,65536,98304,131072")
    ap.add_argument("--variants", default="baseline_qlora,qlora_liger")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--work", default="/tmp/loraflow-bench")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = train_gpu.build_model(args.model, work / args.model)
    lengths = build_rows(work / "maxseq.jsonl", base, [int(x) for x in args.lengths.split(",")])
    (work / "maxseq_lengths.json").write_text(json.dumps(lengths))
    print("lengths", lengths, flush=True)
    results = []
    for v in args.variants.split(","):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--variant", v, *sys.argv[1:]], capture_output=True, text=True)
        (work / f"maxseq_{v}.log").write_text(proc.stderr[-100_000:])
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{v}: FAILED rc={proc.returncode}\n{proc.stdout[-1500:]}\n{proc.stderr[-2500:]}", flush=True)
            continue
        r = json.loads(line[7:])
        r["wall_s"] = round(time.perf_counter() - t)
        results.append(r)
        print(f"{v}: longest fit {r['longest_fit']} tokens; first failure {r['first_failure']} ({r['error']}); "
              f"peaks {[(s['tokens'], s['peak_memory_mb']) for s in r['steps']]} ({r['wall_s']}s)", flush=True)
        Path(args.out, f"max_seq_{args.model}{args.tag}.json").write_text(json.dumps(
            {"args": vars(args), "lengths": lengths, "results": results}, indent=1))


if __name__ == "__main__":
    main()
