"""DP-LoRA on CPU: task metric and canary exposure at epsilon 1, 4, 8 and infinity (no DP), median of seeds.

    .venv/bin/python bench/privacy_cpu.py --project <folder where `loraflow demo` ran> --task demo
    .venv/bin/python bench/privacy_cpu.py --project <same> --task copy

``demo``: the demo's ticket triage (its clean train/eval splits and embedded base). ``copy``: a copy-style
task built here (the answer is a random reference code that appears in the prompt: learnable only by
copying, while the canaries can only be memorised). Each run is its own process (peak memory is the
process's), trains with the project's train stage (canaries planted as the demo plants them, the generic
mix on), scores the held-out split with the evaluate stage's code and runs the leak probe. The private
and non-private runs use the same settings (``--batch``, ``--epochs``, ``--lr``; fused LoRA off in both) but
for ``train.privacy``. Keep nothing else running: two torch jobs on two cores slow each other several-fold.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _isolated import run_isolated, save, spread  # noqa: E402

COPY_TASK = {"name": "copy-reference", "kind": "text", "description": "Repeat the reference code given.",
             "max_new_tokens": 24}


def copy_data(out: Path, n_train: int = 500, n_eval: int = 120, seed: int = 0) -> tuple[Path, Path]:
    """Prompts that carry a random reference code; the answer is the code. No two records share one."""
    rng = random.Random(seed)
    seen: set[str] = set()
    templates = ["Please repeat the reference {c} exactly.", "Copy this reference: {c}",
                 "My booking reference is {c}, can you confirm it?", "Reference {c}. What was the reference?"]

    def code() -> str:
        while True:
            c = "-".join("".join(rng.choice(string.ascii_uppercase) for _ in range(3)) for _ in range(3))
            if c not in seen:
                seen.add(c)
                return c

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n in (("train", n_train), ("eval", n_eval)):
        path = out / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for _ in range(n):
                c = code()
                fh.write(json.dumps({"messages": [{"role": "user", "content": rng.choice(templates).format(c=c)},
                                                  {"role": "assistant", "content": c}]}) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def one(spec: dict) -> dict:
    import resource

    from pipeline.canaries import make_canaries
    from pipeline.config import EvaluateConfig, TaskConfig, load_params
    from pipeline.evaluate.scoring import _load, evaluate_model, probe_model
    from pipeline.train.trainer import train

    project = Path(spec["project"])
    p = load_params(project / "params.yaml")
    task = p.task if spec["task"] == "demo" else TaskConfig(**COPY_TASK)
    priv = {"enabled": True, "target_epsilon": spec["epsilon"]} if spec["epsilon"] > 0 else {}
    trl = {**p.train.trl, "seed": spec["seed"], "save_steps": 10_000}
    if spec["epsilon"] >= 0:  # -1: no DP with the project's own settings (what users train with today)
        trl.update(per_device_train_batch_size=spec["batch"], num_train_epochs=spec["epochs"], learning_rate=spec["lr"])
    with tempfile.TemporaryDirectory() as tmp:
        cfg = p.train.model_copy(update={"out_dir": f"{tmp}/adapter", "checkpoint_dir": f"{tmp}/ckpt",
                                         "fused_lora": False, "trl": trl,
                                         "privacy": type(p.train.privacy)(**priv)})
        canaries = [c for c in make_canaries(p.probes) for _ in range(p.probes.repetitions)]
        started = time.perf_counter()
        m = train(cfg, project / p.base.out_dir, Path(spec["train"]), None,
                  generic_file=project / "data/clean/generic/clean.jsonl", canaries=canaries)
        train_s = time.perf_counter() - started
        loaded = _load(project / p.base.out_dir, Path(cfg.out_dir))
        ecfg = EvaluateConfig(batch_size=32)
        res = evaluate_model(project / p.base.out_dir, Path(cfg.out_dir), Path(spec["eval"]), ecfg, task, loaded=loaded)
        probes, _ = probe_model(*loaded, None, p.probes, ecfg)
    leak = probes["leak"]["canaries"]
    metric = "exact_match"
    return {**{k: spec[k] for k in ("task", "epsilon", "seed")}, metric: res["summary"][metric],
            "valid": res["summary"].get("valid"),
            "exposure_max": max(c["exposure"] for c in leak), "exposure_median": statistics.median(c["exposure"] for c in leak),
            "canaries_completed": sum(bool(c["completed"]) for c in leak), "canaries": len(leak),
            "epsilon_spent": (m["privacy"] or {}).get("epsilon"), "noise_multiplier": (m["privacy"] or {}).get("noise_multiplier"),
            "steps": m["steps"], "train_s": round(train_s, 1), "s_per_step": round(train_s / max(m["steps"], 1), 3), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def summarise(runs: list[dict]) -> dict:
    """Median (min-max) per epsilon over seeds; time and memory as ratios to the same seed's non-private
    run with the same settings (epsilon 0)."""
    summary: dict = {}
    for r in runs:  # runs recorded before s_per_step was
        r.setdefault("s_per_step", round(r["train_s"] / max(r["steps"], 1), 3))
    base = {s: next((r for r in runs if r["seed"] == s and r["epsilon"] == 0), None) for s in {r["seed"] for r in runs}}
    for eps in sorted({r["epsilon"] for r in runs}):
        rs = [r for r in runs if r["epsilon"] == eps]

        def med(key, rows=rs):
            return spread(r[key] for r in rows)

        summary[{0: "no DP, same settings", -1: "inf (no DP, project settings)"}.get(eps, str(eps))] = {
            "exact_match": med("exact_match"), "exposure_max": med("exposure_max"),
            "exposure_median": med("exposure_median"), "canaries_completed": med("canaries_completed"),
            "epsilon_spent": med("epsilon_spent") if eps > 0 else None,
            # Per optimizer step: Opacus' epoch is int(1/q) Poisson batches, not rows / batch.
            "step_time_ratio_vs_no_dp": med("r", [{"r": r["s_per_step"] / base[r["seed"]]["s_per_step"]} for r in rs])
            if all(base.values()) else None,
            "memory_ratio_vs_no_dp": med("r", [{"r": r["peak_rss_mb"] / base[r["seed"]]["peak_rss_mb"]} for r in rs])
            if all(base.values()) else None}
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", required=True)
    ap.add_argument("--task", choices=["demo", "copy"], default="demo")
    ap.add_argument("--eps", default="1,4,8,0,-1", help="0 = no DP with the same settings (the time and "
                    "memory baseline); -1 = no DP with the project's own training settings (infinite epsilon)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=float, default=6)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--out", default="")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    ap.add_argument("--summarise", nargs="*", help="result files to merge (runs of the same task) and summarise")
    a = ap.parse_args()
    if a.summarise:
        runs = [r for f in a.summarise for r in json.loads(Path(f).read_text())["runs"]]
        print(json.dumps(summarise(runs), indent=1))
        return
    if a.one:
        print("RESULT " + json.dumps(one(json.loads(a.one))), flush=True)
        return
    project = Path(a.project).resolve()
    if a.task == "demo":
        train_file, eval_file = project / "data/augmented/train.jsonl", project / "data/clean/eval/clean.jsonl"
    else:
        train_file, eval_file = copy_data(project / "bench-copy")
    runs = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        for eps in [float(e) for e in a.eps.split(",")]:  # each seed's epsilons back to back: paired
            spec = {"project": str(project), "task": a.task, "epsilon": eps, "seed": seed, "batch": a.batch,
                    "epochs": a.epochs, "lr": a.lr, "train": str(train_file), "eval": str(eval_file)}
            r = run_isolated(__file__, project, spec)
            runs.append(r)
            print(f"{a.task} eps={eps} seed={seed}: exact {r['exact_match']:.3f}, exposure max "
                  f"{r['exposure_max']:.2f} bits, completed {r['canaries_completed']}/{r['canaries']}, "
                  f"spent {r['epsilon_spent']}, train {r['train_s']} s ({r['steps']} steps), rss {r['peak_rss_mb']} MB", flush=True)
    save(a.out, {"task": a.task, "machine": "x86_64, 2 cores, CPU", "date": time.strftime("%Y-%m-%d"),
                 "command": " ".join(sys.argv), "settings": {"batch": a.batch, "epochs": a.epochs, "lr": a.lr},
                 "summary": summarise(runs), "runs": runs})


if __name__ == "__main__":
    main()
