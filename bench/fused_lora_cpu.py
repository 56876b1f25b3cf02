"""Fused LoRA path on CPU: the demo's train stage with ``train.fused_lora`` off and on, paired.

    .venv/bin/python bench/fused_lora_cpu.py --base artifacts/base --train data/clean/train/<file>.jsonl

Each round trains the demo configuration (params.yaml's train section, ``--steps`` optimizer steps) once
with peft's forward and once with the fused path, each in its own process, in alternating order; the
ratio is per round (fused tokens/s over peft tokens/s) and reported as median (min-max). Keep nothing
else running: two torch jobs on two cores slow each other several-fold.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(base: str, train_file: str, steps: int, fused: bool) -> dict:
    from pipeline.config import load_params
    from pipeline.train.trainer import train

    cfg = load_params(ROOT / "params.yaml").train.model_copy(update={"max_steps": steps, "fused_lora": fused})
    with tempfile.TemporaryDirectory() as tmp:
        cfg = cfg.model_copy(update={"out_dir": f"{tmp}/adapter", "checkpoint_dir": f"{tmp}/ckpt"})
        m = train(cfg, Path(base), Path(train_file))
    return {"fused": fused, "tokens_per_s": m["tokens_per_s"], "duration_s": m["duration_s"],
            "final_loss": m["final_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--one", choices=["peft", "fused"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.base, args.train, args.steps, args.one == "fused")), flush=True)
        return
    ratios = []
    for r in range(args.rounds):
        res = {}
        for kind in (("peft", "fused") if r % 2 == 0 else ("fused", "peft")):
            out = subprocess.run([sys.executable, __file__, "--one", kind, *sys.argv[1:]], capture_output=True,
                                 text=True, check=True).stdout
            res[kind] = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
        ratios.append(res["fused"]["tokens_per_s"] / res["peft"]["tokens_per_s"])
        print(f"round {r}: peft {res['peft']['tokens_per_s']:.0f} tok/s (loss {res['peft']['final_loss']:.4f}), "
              f"fused {res['fused']['tokens_per_s']:.0f} tok/s (loss {res['fused']['final_loss']:.4f}): "
              f"{ratios[-1]:.3f}x", flush=True)
    print(f"fused / peft: median {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}), n={len(ratios)}")


if __name__ == "__main__":
    main()
