"""The evaluate stage's generation on vLLM vs transformers' ``generate``, paired in each round.

    python3 bench/eval_engines.py --base DIR --adapter DIR --examples 1000 --rounds 3 --serve-python P

Both run ``evaluate_model`` (the code the stage and the release's re-scoring use) on the same split: the
demo's sanitized eval and train records, cycled to ``--examples`` (its references score the answers, so
the task metrics are compared too). Per round, in alternating order: transformers (``evaluate.batch_size``
``--batch``), then vLLM's offline engine (a fresh process: start-up included in the stage time, and the
generation time alone as the worker measured it). Prints one JSON line per round and the medians with their
spread; docs/benchmarks.md has the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--examples", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--serve-python", default="python3")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    from pipeline.config import EvaluateConfig, SanitizeConfig, ServeConfig, TaskConfig, load_params
    from pipeline.data.sanitize import sanitize_files
    from pipeline.evaluate.scoring import evaluate_model

    tmp = Path(tempfile.mkdtemp(prefix="eval-engines-"))
    rows = []
    for split in ("eval", "train"):
        sanitize_files([ROOT / f"data/raw/tickets_{split}.jsonl"], tmp / split, SanitizeConfig())
        rows += (tmp / split / "clean.jsonl").read_text().splitlines()
    split = tmp / "split.jsonl"
    split.write_text("".join(rows[i % len(rows)] + "\n" for i in range(args.examples)))
    task: TaskConfig = load_params(ROOT / "params.yaml").task
    serve = ServeConfig(python=args.serve_python, dtype="bfloat16", max_model_len=4096, env={})
    out = {"examples": args.examples, "batch": args.batch, "rounds": []}
    for r in range(args.rounds):
        res = {}
        for engine in (("transformers", "vllm") if r % 2 == 0 else ("vllm", "transformers")):
            cfg = EvaluateConfig(out_dir=str(tmp / f"{engine}-{r}"), batch_size=args.batch, engine=engine,
                                 vllm={"gpu_memory_utilization": 0.3})
            t = time.perf_counter()
            got = evaluate_model(Path(args.base), Path(args.adapter), split, cfg, task, serve=serve)
            res[engine] = {"stage_s": round(time.perf_counter() - t, 2), "generation_s": got["speed"]["seconds"],
                           "tokens": got["speed"]["tokens"], "summary": got["summary"],
                           "predictions": got["predictions"]}
        a, b = res["transformers"], res["vllm"]
        same = sum(x == y for x, y in zip(a.pop("predictions"), b.pop("predictions")))
        row = {"round": r + 1, **res, "same_answers": round(same / args.examples, 4),
               "stage_ratio": round(a["stage_s"] / b["stage_s"], 2),
               "generation_ratio": round(a["generation_s"] / b["generation_s"], 2)}
        out["rounds"].append(row)
        print(json.dumps(row), flush=True)
    for key in ("stage_ratio", "generation_ratio", "same_answers"):
        vals = [x[key] for x in out["rounds"]]
        out[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    print(json.dumps({k: v for k, v in out.items() if k != "rounds"}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
