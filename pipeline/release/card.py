"""The model card of a version, in the Hugging Face format: YAML front matter, then markdown.

Logged as ``README.md`` next to the adapter (``adapter/README.md`` in the run), so the adapter folder can
be pushed to a hub unchanged, and used as the registered version's description. Canary secrets appear
only as hashes; the data card is the sanitizer's (redacted counts, no values).
"""

from __future__ import annotations

import yaml

from pipeline.config import Params


def _base_model(p: Params) -> str:
    return "loraflow/builtin-tiny-llama" if p.base.model.startswith("builtin:") else p.base.model


def front_matter(p: Params, eval_metrics: dict[str, dict], decision: dict) -> dict:
    cand = eval_metrics.get("candidate", {})
    interval = decision.get("interval") or {}
    results = [{"type": k, "name": k, "value": round(float(v), 4)} for k, v in cand.items()
               if k in p.task.all_metric_names and isinstance(v, (int, float))]
    if interval:
        results.append({"type": f"{decision.get('metric')}_difference_vs_{decision.get('reference', '').replace(' ', '_')}",
                        "name": f"{decision.get('metric')} difference, {interval['confidence']:.0%} CI "
                                f"[{interval['low']:+.4f}, {interval['high']:+.4f}]",
                        "value": round(interval["mean"], 4)})
    return {
        "base_model": _base_model(p),
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "tags": ["loraflow", p.train.adapter, p.train.method, "lora", p.task.kind, p.task.name],
        "datasets": [*p.data.train, *p.data.eval],
        "metrics": list(p.task.all_metric_names),
        "model-index": [{"name": p.project.name, "results": [{
            "task": {"type": "text-generation", "name": p.task.name},
            "dataset": {"name": f"{p.task.name} held-out split", "type": ", ".join(p.data.eval) or "eval"},
            "metrics": results}]}],
    }


def privacy_line(priv: dict | None) -> str:
    """The guarantee in one line (model card, dossier), or "none"."""
    if not priv:
        return "none (trained without a privacy guarantee)"
    eps = "infinite (no noise)" if priv.get("epsilon") is None else f"{priv['epsilon']:.3f}"
    line = (f"DP-SGD ({priv['library']}, {priv['accountant'].upper()} accountant): epsilon {eps}, delta "
            f"{priv['delta']:.2e} per {priv['unit']}; noise multiplier {priv['noise_multiplier']}, clipping "
            f"{priv['max_grad_norm']}, sampling rate {priv['sample_rate']}, {priv['steps']} steps over {priv['rows']} rows")
    if priv.get("rows_per_record_max", 1) > 1:
        rec = "infinite" if priv.get("record_epsilon") is None else f"{priv['record_epsilon']:.3f}"
        line += (f"; a record is up to {priv['rows_per_record_max']} rows, so per record epsilon {rec}, "
                 f"delta {priv['record_delta']:.2e} (group privacy)")
    return line


def _table(eval_metrics: dict[str, dict]) -> str:
    names = [m for m in next(iter(eval_metrics.values()), {}) if m != "n"]
    head = "| model | " + " | ".join(names) + " | n |\n|---|" + "---|" * (len(names) + 1)
    rows = []
    for model, v in eval_metrics.items():
        cells = [f"{v[m]:.3f}" if isinstance(v.get(m), (int, float)) else "-" for m in names]
        rows.append(f"| {model} | " + " | ".join(cells) + f" | {v.get('n', '-')} |")
    return head + "\n" + "\n".join(rows)


def model_card(p: Params, *, eval_metrics: dict[str, dict], decision: dict, data_card: str,
               lineage: dict[str, str], train_metrics: dict, probes: dict) -> str:
    t = p.train
    interval = decision.get("interval")
    ci = (f"{decision.get('metric')} difference vs {decision.get('reference')}: {interval['mean']:+.4f}, "
          f"{interval['confidence']:.0%} CI [{interval['low']:+.4f}, {interval['high']:+.4f}] "
          f"(paired bootstrap, {interval['samples']} resamples, seed {interval['seed']}, n={interval['n']})"
          if interval else "no interval (see the reasons)")
    lin = "\n".join(f"- `{k}`: `{v}`" for k, v in sorted(lineage.items()))
    canaries = probes.get("canaries") or []
    leak = (f"{len(canaries)} canaries (sha256 prefixes {', '.join(c['digest'] for c in canaries)}) planted "
            f"{probes.get('repetitions', 1)}x; max exposure {max((c['exposure'] for c in canaries), default=0):.2f} "
            f"bits, completed {sum(c['completed'] for c in canaries)}" if canaries else "no canaries planted")
    body = f"""# {p.project.name}

A {t.adapter.upper()} adapter (r={t.lora_r}, alpha={t.lora_alpha}, targets `{t.target_modules}`, {t.method.upper()})
on `{_base_model(p)}` for the task `{p.task.name}` (answers of kind `{p.task.kind}`), trained and released by
loraflow.

## Intended use and limits

{p.task.description or f"The `{p.task.name}` task."}

{p.task.limitations or "Evaluated only on the held-out split described below."}

Trained on redacted data: typed placeholders (`<EMAIL>`, `<PHONE>`, `<CARD>`, ...) replace personal data
and secrets, so the model answers with placeholders where the data had them.

## Evaluation (held-out split, greedy decoding)

{_table(eval_metrics)}

{ci}

## Gate decision: {"PROMOTE" if decision.get("promote") else "keep the current champion"}

Reference: {decision.get("reference")}; metric: {decision.get("metric")}.

{chr(10).join(f"- {r}" for r in decision.get("reasons", []))}

Leak probe: {leak}.

## Training

- method {t.method}, adapter {t.adapter} (r {t.lora_r}, alpha {t.lora_alpha}), learning rate
  {t.trl_value("learning_rate")}, epochs {t.trl_value("num_train_epochs")}, batch
  {t.trl_value("per_device_train_batch_size")} x {t.trl_value("gradient_accumulation_steps")}, max length
  {t.trl_value("max_length")}, packing {t.packing}, seed {t.seed}; TRL settings given: {t.trl or "none"}
- steps {train_metrics.get("steps")}, duration {train_metrics.get("duration_s")} s, final loss
  {train_metrics.get("final_loss")}, device {train_metrics.get("device")}
- differential privacy: {privacy_line(train_metrics.get("privacy"))}
- continued from: {(train_metrics.get("continual") or {}).get("from") or "no (trained from scratch)"}

## Lineage

{lin}

{data_card}
"""
    return "---\n" + yaml.safe_dump(front_matter(p, eval_metrics, decision), sort_keys=False) + "---\n\n" + body
