"""Data-parallel scaling of the train stage: the same configuration on 1 and on N GPUs, in one invocation.

    python bench/train_ddp.py --model llama-3.2-1b --variant qlora_packed_liger_a3 --gpus 2 --repeats 2

Each run is loraflow's `train` (the stage's own function, as `python -m pipeline train` calls it) under
`torchrun --nproc_per_node K`, on the random-weight model and data of bench/train_gpu.py. Micro-batch and
accumulation are per GPU, so K GPUs process K times the tokens per optimizer step. Reported per run:
steady tokens/s over all GPUs (whole optimizer steps, device synchronised), peak memory of every rank,
which ranks wrote outputs; then the scaling efficiency tokens/s(K) / (K x tokens/s(1)), and each run's
adapter loaded on the base and scored (mean token loss) on held-out rows the runs never trained on.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_gpu import VARIANTS, build_data, build_model  # noqa: E402


def rank_main(args) -> None:
    """One rank of a torchrun launch: train, then report what this rank saw and wrote."""
    import torch

    from bench.train_gpu import StepTimer
    from pipeline.config import TrainConfig
    from pipeline.train.trainer import train

    work = Path(args.work)
    opts = dict(VARIANTS[args.variant])
    opts.pop("batch_size", None)
    accum = opts.pop("accum", 4)
    out = work / "out" / f"gpus{os.environ['WORLD_SIZE']}_r{args.repeat}"
    cfg = TrainConfig(out_dir=str(out), checkpoint_dir=str(work / "ckpt" / out.name), lora_r=16, lora_alpha=32, **opts, trl=dict(max_steps=args.steps, per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=accum, max_length=args.max_length, learning_rate=1e-4, logging_steps=1, save_steps=10_000, warmup_steps=0.0))
    timer = StepTimer()
    m = train(cfg, work / args.model, work / "train.jsonl", None, extra_callbacks=[timer.callback])
    report = {"rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"]), "wrote": bool(m),
              "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1), **timer.steady(args.warmup),
              "step_times": [round(s, 4) for s, _ in timer.steps], "tokens_per_step": [n for _, n in timer.steps],
              "out_dir": str(out)}
    if m:
        report.update(steps=m["steps"], tokens_seen=m["tokens_seen"], final_loss=m["final_loss"])
    print("RANKRESULT " + json.dumps(report), flush=True)


def score(base: Path, adapter: Path, rows: list[dict]) -> float:
    """Mean token loss of ``rows`` under base + adapter (chat template, all tokens)."""
    import torch
    from peft import PeftModel

    from pipeline.modeling import load_base

    model, tok = load_base(base)
    model = PeftModel.from_pretrained(model, adapter).cuda().eval()
    total, n = 0.0, 0
    for r in rows:
        ids = tok(tok.apply_chat_template(r["messages"], tokenize=False), return_tensors="pt",
                  add_special_tokens=False).input_ids[:, :2048].cuda()
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        total += loss.item() * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--variant", default="qlora_packed_liger_a3")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=5, help="packed rows per GPU per micro-batch")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=1200)
    ap.add_argument("--work", default="/tmp/loraflow-ddp")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--rank-run", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_run:
        rank_main(args)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    build_model(args.model, work / args.model)
    data = build_data(work / "all.jsonl", args.rows, args.max_length)
    lines = data.read_text().splitlines()
    (work / "train.jsonl").write_text("\n".join(lines[:-64]) + "\n")
    held_out = [json.loads(x) for x in lines[-64:]]
    runs = []
    for rep in range(args.repeats):
        for k in (1, args.gpus):
            t = time.perf_counter()
            proc = subprocess.run(["torchrun", "--standalone", f"--nproc_per_node={k}", __file__, "--rank-run",
                                   "--repeat", str(rep), *sys.argv[1:]], capture_output=True, text=True)
            ranks = [json.loads(x.split(" ", 1)[1]) for x in proc.stdout.splitlines() if x.startswith("RANKRESULT ")]
            if proc.returncode or len(ranks) != k:
                print(f"r{rep} {k} GPU(s): FAILED\n{proc.stderr[-3000:]}", flush=True)
                continue
            ranks.sort(key=lambda r: r["rank"])
            run = {"repeat": rep, "gpus": k, "tokens_per_s": ranks[0]["steady_tokens_per_s"],
                   "step_s": ranks[0]["steady_step_s"], "peak_memory_mb": [r["peak_memory_mb"] for r in ranks],
                   "wrote": [r["wrote"] for r in ranks], "ranks": ranks, "seconds": round(time.perf_counter() - t)}
            run["eval_loss"] = round(score(work / args.model, Path(ranks[0]["out_dir"]), held_out), 4)
            runs.append(run)
            print(f"r{rep} {k} GPU(s): {run['tokens_per_s']:,.0f} tok/s, step {run['step_s']:.3f}s, peak MB per GPU "
                  f"{run['peak_memory_mb']}, wrote {run['wrote']}, held-out loss {run['eval_loss']} "
                  f"({run['seconds']}s)", flush=True)
            Path(args.out, f"train_ddp_{args.model}.json").write_text(json.dumps({"args": vars(args), "runs": runs},
                                                                                 indent=1))
    eff = []
    for rep in range(args.repeats):
        one = next((r for r in runs if r["repeat"] == rep and r["gpus"] == 1), None)
        many = next((r for r in runs if r["repeat"] == rep and r["gpus"] == args.gpus), None)
        if one and many:
            eff.append(many["tokens_per_s"] / one["tokens_per_s"])
    if eff:
        print(f"\nscaling {args.gpus} GPUs / 1 GPU: median {statistics.median(eff):.2f}x "
              f"({min(eff):.2f}-{max(eff):.2f}, n={len(eff)}); efficiency {statistics.median(eff) / args.gpus:.0%}")


if __name__ == "__main__":
    main()
