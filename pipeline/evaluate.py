"""The evaluate stage: generate answers on the held-out split and score them.

    python -m pipeline evaluate

Metrics per model: ``json_valid`` (the answer parses as a JSON object), ``exact_match`` (the parsed
object equals the reference) and ``field_accuracy`` (share of reference fields reproduced). The
per-example exact-match vector is kept so the gate can run a paired significance test against the
champion on the very same examples.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import EvaluateConfig
from pipeline.device import detect
from pipeline.jsonio import write_json
from pipeline.train import load_base, load_chat_file


def score(prediction: str, reference: str) -> dict[str, float]:
    ref = json.loads(reference)
    try:
        pred = json.loads(prediction)
    except (json.JSONDecodeError, ValueError):
        pred = None
    if not isinstance(pred, dict):
        return {"json_valid": 0.0, "exact_match": 0.0, "field_accuracy": 0.0}
    fields = sum(1 for k, v in ref.items() if pred.get(k) == v) / max(len(ref), 1)
    return {"json_valid": 1.0, "exact_match": float(pred == ref), "field_accuracy": fields}


def aggregate(scores: list[dict[str, float]]) -> dict[str, float]:
    n = max(len(scores), 1)
    return {k: round(sum(s[k] for s in scores) / n, 4) for k in ("json_valid", "exact_match", "field_accuracy")}


def generate(model, tokenizer, prompts: list[list[dict]], cfg: EvaluateConfig) -> list[str]:
    import torch

    dev = detect()
    model.to(dev.type).eval()
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    for i in range(0, len(prompts), cfg.batch_size):
        batch = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts[i:i + cfg.batch_size]]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(dev.type)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]
        outputs.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    return outputs


def evaluate_model(base_dir: Path, adapter_dir: Path | None, eval_file: Path, cfg: EvaluateConfig) -> dict:
    """Score the base model (``adapter_dir=None``) or base + adapter on ``eval_file``."""
    model, tokenizer = load_base(base_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    rows = load_chat_file(eval_file)
    if cfg.max_examples:
        rows = rows[: cfg.max_examples]
    preds = generate(model, tokenizer, [r["prompt"] for r in rows], cfg)
    scores = [score(p, r["completion"][0]["content"]) for p, r in zip(preds, rows)]
    return {
        "n": len(rows),
        **aggregate(scores),
        "per_example_exact": [int(s["exact_match"]) for s in scores],
        "samples": [{"prompt": r["prompt"][-1]["content"], "reference": r["completion"][0]["content"],
                     "prediction": p} for p, r in list(zip(preds, rows))[:5]],
    }


def evaluate_stage(base_dir: Path, adapter_dir: Path, eval_file: Path, cfg: EvaluateConfig) -> dict:
    """Evaluate base and candidate; write ``metrics.json`` (DVC metrics) and ``details.json``."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = evaluate_model(base_dir, None, eval_file, cfg)
    cand = evaluate_model(base_dir, adapter_dir, eval_file, cfg)
    keys = ("n", "json_valid", "exact_match", "field_accuracy")
    metrics = {"base": {k: base[k] for k in keys}, "candidate": {k: cand[k] for k in keys}}
    write_json(out / "metrics.json", metrics)
    write_json(out / "details.json", {"base": base, "candidate": cand})
    return metrics
