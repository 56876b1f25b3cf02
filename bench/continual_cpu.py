"""Continual training on CPU: after new data arrives, train from scratch (with the generic mix) or continue
from the champion's adapter, without and with the EWC penalty; median of seeds.

    .venv/bin/python bench/continual_cpu.py --project <folder where `loraflow demo` ran>

Old data: the demo's training split (the champion is trained on it, per seed, with ``train.continual`` on
so its Fisher information is stored). New data: the drift scenario's feature requests
(``data/drift/feature_requests.jsonl``, a category the old data never has): 180 to train on, 60 held out.
Each condition trains on the new records only and is scored on the new held-out records, on the old eval
split (what was learnt before) and on the generic forgetting set (next-token accuracy). Every run is its
own process. Keep nothing else running: two torch jobs on two cores slow each other several-fold.
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
sys.path.insert(0, str(ROOT / "bench"))

from _isolated import run_isolated, save, spread  # noqa: E402


def one(spec: dict) -> dict:
    from pipeline.config import EvaluateConfig, load_params
    from pipeline.evaluate.scoring import _load, evaluate_model, probe_model
    from pipeline.io import load_chat_file
    from pipeline.train.trainer import train

    project = Path(spec["project"])
    p = load_params(project / "params.yaml")
    base = project / p.base.out_dir
    trl = {**p.train.trl, "seed": spec["seed"], "save_steps": 10_000}
    cont = {"from_champion": True, "ewc_lambda": spec["ewc_lambda"]}
    cfg = p.train.model_copy(update={"out_dir": spec["out"], "checkpoint_dir": f"{spec['out']}-ckpt", "trl": trl,
                                     "continual": type(p.train.continual)(**cont)})
    generic = project / "data/clean/generic/clean.jsonl"
    started = time.perf_counter()
    train(cfg, base, Path(spec["train"]), None, generic_file=generic,
          init_adapter=Path(spec["init"]) if spec.get("init") else None)
    train_s = time.perf_counter() - started
    if not spec.get("score", True):
        return {"train_s": round(train_s, 1)}
    loaded = _load(base, Path(spec["out"]))
    ecfg = EvaluateConfig(batch_size=32)
    slices = {"new": Path(spec["new_eval"]), "old": project / "data/clean/eval/clean.jsonl"}
    res = evaluate_model(base, Path(spec["out"]), slices, ecfg, p.task, loaded=loaded)
    probes, _ = probe_model(*loaded, load_chat_file(project / "data/clean/forgetting/clean.jsonl"), None, ecfg)
    return {"new_exact": res["slices"]["new"]["summary"]["exact_match"],
            "old_exact": res["slices"]["old"]["summary"]["exact_match"],
            "forgetting_accuracy": probes["forgetting"]["score"], "train_s": round(train_s, 1)}


def run(project: Path, spec: dict) -> dict:
    return run_isolated(__file__, project, spec)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ewc-lambda", default="1,10", help="comma-separated EWC strengths to compare")
    ap.add_argument("--skip-baselines", action="store_true", help="only the EWC conditions (scratch and "
                    "lambda 0 measured in another invocation)")
    ap.add_argument("--out", default="")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(json.loads(a.one))), flush=True)
        return
    project = Path(a.project).resolve()
    lines = (ROOT / "data/drift/feature_requests.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        new_train, new_eval = Path(tmp, "new_train.jsonl"), Path(tmp, "new_eval.jsonl")
        new_eval.write_text("".join(lines[:60]), encoding="utf-8")
        new_train.write_text("".join(lines[60:]), encoding="utf-8")
        conditions = ([] if a.skip_baselines else [("scratch", None, 0.0), ("champion", "init", 0.0)]) + \
            [(f"champion+ewc{lam:g}", "init", lam) for lam in (float(x) for x in a.ewc_lambda.split(","))]
        for seed in [int(s) for s in a.seeds.split(",")]:
            champ = f"{tmp}/champion-{seed}"
            common = {"project": str(project), "seed": seed, "new_eval": str(new_eval)}
            run(project, {**common, "out": champ, "train": str(project / "data/augmented/train.jsonl"),
                          "ewc_lambda": 0.0, "score": False})
            for name, init, lam in conditions:
                r = run(project, {**common, "out": f"{tmp}/{name}-{seed}", "train": str(new_train),
                                  "init": champ if init else None, "ewc_lambda": lam})
                runs.append({"condition": name, "seed": seed, **r})
                print(f"seed {seed} {name}: new {r['new_exact']:.3f}, old {r['old_exact']:.3f}, forgetting-set "
                      f"{r['forgetting_accuracy']:.3f}, train {r['train_s']} s", flush=True)
    summary = {}
    for name, _, _ in conditions:
        rs = [r for r in runs if r["condition"] == name]
        summary[name] = {k: spread(r[k] for r in rs) for k in ("new_exact", "old_exact", "forgetting_accuracy", "train_s")}
    save(a.out, {"machine": "x86_64, 2 cores, CPU", "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                 "summary": summary, "runs": runs})


if __name__ == "__main__":
    main()
