"""Is the embedded base a language model? The random base and the pretrained base, side by side.

    .venv/bin/python bench/base_quality.py            # about 9 minutes on 2 CPU cores; prints markdown rows

For each base (the old random weights: no pretraining, no copy circuit, no output scale; and the
params.yaml default), the
train stage fine-tunes a LoRA adapter with the params.yaml training settings on
1. the demo task (sanitized demo tickets -> JSON triage), and
2. a copy task of its own: a sentence naming a person, an order id and an amount; the answer reproduces
   one of those values, and the held-out values never occur in training,
then reports on the held-out split: loss on completion tokens (nats/token), exact match under greedy
decoding and under sampling at temperature 1.0 / top-p 1.0 (what the `openai` client sends by default).
"""

from __future__ import annotations

import json
import random
import string
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import TaskConfig, load_params  # noqa: E402
from pipeline.data.sanitize import new_index, sanitize_files  # noqa: E402
from pipeline.evaluate.generation import completion_loss, generate  # noqa: E402
from pipeline.io import load_chat_file  # noqa: E402
from pipeline.modeling import load_base  # noqa: E402
from pipeline.tasks import build_task  # noqa: E402
from pipeline.base.builtin import build_builtin  # noqa: E402
from pipeline.train.trainer import train  # noqa: E402

FIRST = ["Maria", "Jonas", "Aiko", "Pedro", "Fatima", "Liam", "Chen", "Olga", "Kwame", "Sofia", "Ravi", "Noor"]
LAST = ["Keller", "Okafor", "Tanaka", "Silva", "Haddad", "Murphy", "Wang", "Ivanova", "Mensah", "Rossi"]


def copy_task(n_train: int = 600, n_eval: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Answers copy a value (name, order id, amount) out of the prompt; eval values are unseen."""
    rng = random.Random(seed)
    seen: set[str] = set()

    def record(split_seen: set[str] | None) -> dict:
        while True:
            name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
            order = f"{rng.choice(string.ascii_uppercase)}{rng.choice(string.ascii_uppercase)}-{rng.randint(0, 99999):05d}"
            amount = f"{rng.randint(1, 999)}.{rng.randint(0, 99):02d}"
            if split_seen is None or not ({order, amount} & split_seen):
                break
        field = rng.choice(["customer", "order id", "amount"])
        text = (f"{name} placed order {order} for {amount} EUR last week and asked about delivery. "
                f"Reply with the {field} only.")
        answer = {"customer": name, "order id": order, "amount": amount}[field]
        if split_seen is None:
            seen.update({order, amount})
        return {"prompt": text, "completion": answer}

    train_rows = [record(None) for _ in range(n_train)]
    eval_rows = [record(seen) for _ in range(n_eval)]
    return train_rows, eval_rows


def scores(base_dir: Path, adapter: Path, eval_file: Path, task: TaskConfig) -> dict:
    from peft import PeftModel

    model, tok = load_base(base_dir)
    model = PeftModel.from_pretrained(model, adapter)
    rows = load_chat_file(eval_file)
    t = build_task(task)
    refs = [r["completion"][0]["content"] for r in rows]
    out = {"completion_loss": round(completion_loss(model, tok, rows), 4)}
    for name, temp in (("greedy", 0.0), ("sampled_t1", 1.0)):
        preds = generate(model, tok, [r["prompt"] for r in rows], task, 32, temperature=temp, seed=0)
        out[f"exact_{name}"] = round(sum(t.score(p, r).values["exact_match"] for p, r in zip(preds, refs)) / len(rows), 4)
    return out


def main() -> None:
    p = load_params(ROOT / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        idx = new_index(p.sanitize)
        sanitize_files([ROOT / "data/raw/tickets_train.jsonl"], tmp / "train", p.sanitize, index=idx,
                       validation_fraction=p.data.validation_fraction)
        sanitize_files([ROOT / "data/raw/tickets_eval.jsonl"], tmp / "eval", p.sanitize, reference=idx)
        sanitize_files([ROOT / "data/raw/generic_chat.jsonl"], tmp / "generic", p.sanitize)
        copy_train, copy_eval = copy_task()
        for name, rows in (("copy_train", copy_train), ("copy_eval", copy_eval)):
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        sanitize_files([tmp / "copy_train.jsonl"], tmp / "copy", p.sanitize)
        sanitize_files([tmp / "copy_eval.jsonl"], tmp / "copy_eval", p.sanitize)
        corpus = [tmp / "train/clean.jsonl"]
        tasks = {"demo": (tmp / "train/clean.jsonl", tmp / "eval/clean.jsonl", p.task),
                 "copy": (tmp / "copy/clean.jsonl", tmp / "copy_eval/clean.jsonl", TaskConfig(kind="text", max_new_tokens=16))}
        rows = []
        old = {"pretrain_steps": 0, "copy_circuit": False, "output_scale": 1.0, "rope_theta": 10000.0}
        variants = (("random base (before issue 9)", old), (f"pretrained base ({p.base.builtin.pretrain_steps} steps, circuit, "
                                                            f"output x{p.base.builtin.output_scale:g})", {}))
        for label, update in variants:
            cfg = p.base.builtin.model_copy(update=update)
            steps = cfg.pretrain_steps
            t0 = time.perf_counter()
            base_dir = build_builtin(cfg, corpus, tmp / f"base-{steps}", chat_files=[tmp / "generic/clean.jsonl"])
            base_s = time.perf_counter() - t0
            pre = json.loads((base_dir / "pretrain.json").read_text())
            for task_name, (train_file, eval_file, task) in tasks.items():
                out = tmp / f"adapter-{steps}-{task_name}"
                tcfg = p.train.model_copy(update={"out_dir": str(out), "checkpoint_dir": str(tmp / "ckpt")})
                m = train(tcfg, base_dir, train_file, None, generic_file=tmp / "generic/clean.jsonl")
                s = scores(base_dir, out, eval_file, task)
                rows.append(f"| {date.today()} | x86_64 2 cores | {label} | {task_name} | base build {base_s:.0f} s, "
                            f"pretrain loss {pre.get('final_loss')} | fine-tune {m['duration_s']:.0f} s, final train loss "
                            f"{m['final_loss']:.4f} | {s['completion_loss']} | {s['exact_greedy']} | {s['exact_sampled_t1']} |")
                print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
