"""The evaluate stage: generate answers on the held-out split and score them with the task's metrics.

    python -m pipeline evaluate

For the base model and the candidate (base + adapter) it writes ``metrics.json`` (the per-metric summary,
DVC metrics) and ``details.json``: per-example values of every metric (the gate's paired comparisons use
them), the reason each unusable prediction scored 0, the predictions, a few examples, generation speed,
and the probes (evaluate/probes.py): generic regression-set accuracy, canary exposure (hashes, never
values) and redacted-PII hits in every generated answer. A prediction
that cannot be parsed scores 0 with its reason; it never stops the stage.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.canaries import make_canaries, random_secrets
from pipeline.config import EvaluateConfig, ProbesConfig, ServeConfig, TaskConfig
from pipeline.device import detect
from pipeline.pii import Redactor, build_redactor, digest_key, read_digests
from pipeline.evaluate.generation import generate, paired_speed
from pipeline.evaluate.probes import canary_exposure, next_token_accuracy, pii_hits
from pipeline.evaluate.vllm_engine import EvaluateEngineError, VLLMGenerator, resolve_engine
from pipeline.io import load_chat_file, write_json
from pipeline.modeling import load_base, resolve_base
from pipeline.tasks import Task, build_task

SAMPLES = 5


EvalFiles = Path | dict[str, Path]


def load_slices(eval_files: EvalFiles) -> tuple[list[dict], dict[str, list[int]]]:
    """The rows of every slice, in order, and each slice's [start, end) in them. One file is one slice,
    ``original``; the stage also scores ``curated`` (held-out served traffic) when there is one."""
    files = eval_files if isinstance(eval_files, dict) else {"original": eval_files}
    rows: list[dict] = []
    ranges: dict[str, list[int]] = {}
    for name, path in files.items():
        start = len(rows)
        rows += load_chat_file(path)
        ranges[name] = [start, len(rows)]
    return rows, ranges


def score_predictions(task: Task, predictions: list[str], rows: list[dict],
                      slices: dict[str, list[int]] | None = None) -> dict:
    """Summary, per-example values and reasons for ``predictions`` against ``rows``' references; with
    ``slices`` ({name: [start, end)}), each slice's summary too."""
    references = [r["completion"][-1]["content"] for r in rows]
    prompts = ["\n".join(m["content"] for m in r["prompt"]) for r in rows]
    scores = [task.score(p, ref, q) for p, ref, q in zip(predictions, references, prompts)]
    slices = slices or {"original": [0, len(rows)]}
    return {
        "n": len(rows),
        "summary": task.aggregate(scores, references),
        "slices": {name: {"range": [a, b], "n": b - a,
                          "summary": task.aggregate(scores[a:b], references[a:b]) if b > a else {}}
                   for name, (a, b) in slices.items()},
        "per_example": {m: [s.values[m] for s in scores] for m in task.metrics},
        "reasons": [s.reason for s in scores],
        "predictions": predictions,
        "samples": [{"prompt": q, "reference": ref, "prediction": p, "scores": s.values, "reason": s.reason}
                    for q, ref, p, s in list(zip(prompts, references, predictions, scores))[:SAMPLES]],
    }


def _load(base_dir: Path, adapter_dir: Path | None):
    model, tokenizer = load_base(base_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    return model, tokenizer


def _capped(eval_file: EvalFiles, cfg: EvaluateConfig) -> tuple[list[dict], dict[str, list[int]]]:
    """The eval rows and slices, each slice cut to ``evaluate.max_examples`` when set."""
    rows, slices = load_slices(eval_file)
    if cfg.max_examples:
        kept: list[dict] = []
        for name, (a, b) in slices.items():
            part = rows[a:min(b, a + cfg.max_examples)]
            slices[name] = [len(kept), len(kept) + len(part)]
            kept += part
        rows = kept
    return rows, slices


def _engine(cfg: EvaluateConfig, serve: ServeConfig | None, answers: int) -> str:
    engine, why = resolve_engine(cfg, serve, detect().is_cuda, answers)
    print(f"evaluate: generating with {engine} ({why})", flush=True)
    return engine


def _vllm(base_dir: Path, adapters: dict[str, Path | None], tokenizer, task_cfg: TaskConfig,
          cfg: EvaluateConfig, serve: ServeConfig) -> VLLMGenerator:
    return VLLMGenerator(base_dir, adapters, tokenizer, task_cfg, cfg, serve, Path(cfg.out_dir) / "vllm.log")


def _started(gen: VLLMGenerator, cfg: EvaluateConfig) -> str:
    """Run vLLM; under ``auto`` a failed run (an engine that cannot start beside another GPU job, say) falls
    back to transformers, which computes the same answers slower: returns why, or "" when vLLM ran. An
    explicit ``engine: vllm`` fails the stage instead."""
    try:
        gen.run()
        return ""
    except EvaluateEngineError as err:
        if cfg.engine != "auto":
            raise
        why = str(err).splitlines()[0]
        print(f"evaluate: {why}; generating with transformers instead (evaluate.engine: auto)", flush=True)
        return why


def evaluate_model(base_dir: Path, adapter_dir: Path | None, eval_file: EvalFiles, cfg: EvaluateConfig,
                   task_cfg: TaskConfig, task: Task | None = None, loaded=None,
                   serve: ServeConfig | None = None) -> dict:
    """Score the base model (``adapter_dir=None``) or base + adapter on ``eval_file`` (one file, or named
    slices) with the stage's engine; ``speed`` is the greedy generation throughput.
    ``evaluate.max_examples`` caps each slice."""
    task = task or build_task(task_cfg)
    rows, slices = _capped(eval_file, cfg)
    prompts = [r["prompt"] for r in rows]
    if _engine(cfg, serve, len(prompts)) == "vllm":
        from transformers import AutoTokenizer

        tokenizer = loaded[1] if loaded else AutoTokenizer.from_pretrained(resolve_base(base_dir))
        gen = _vllm(base_dir, {"model": adapter_dir}, tokenizer, task_cfg, cfg, serve)
        gen.add("model", "eval", prompts)
        if not _started(gen, cfg):
            predictions, speed = gen.answers("model", "eval")
            return {**score_predictions(task, predictions, rows, slices), "speed": speed}
    model, tokenizer = loaded or _load(base_dir, adapter_dir)
    speed: dict = {}
    predictions = generate(model, tokenizer, prompts, task_cfg, cfg.batch_size, stats=speed)
    return {**score_predictions(task, predictions, rows, slices), "speed": speed}


def probe_model(model, tokenizer, forgetting_rows: list[dict] | None, probes: ProbesConfig | None,
                cfg: EvaluateConfig) -> tuple[dict, list[str]]:
    """Forgetting (next-token accuracy) and leak probes of one model; also returns the canary
    continuations it generated (scanned for PII by the caller, never stored)."""
    out: dict = {}
    generated: list[str] = []
    if forgetting_rows is not None:
        out["forgetting"] = next_token_accuracy(model, tokenizer, forgetting_rows, cfg.probe_memory_mb)
    if probes is not None and probes.canaries:
        results = []
        for i, canary in enumerate(make_canaries(probes)):
            r = canary_exposure(model, tokenizer, canary, random_secrets(probes, probes.candidates, i),
                                cfg.probe_memory_mb)
            generated.append(r.pop("_continuation"))
            results.append(r)
        out["leak"] = {"canaries": results, "repetitions": probes.repetitions}
    return out, generated


def evaluate_stage(base_dir: Path, adapter_dir: Path, eval_file: EvalFiles, cfg: EvaluateConfig,
                   task_cfg: TaskConfig, forgetting_file: Path | None = None, probes: ProbesConfig | None = None,
                   pii_digest_files: list[Path] = (), redactor: Redactor | None = None,
                   serve: ServeConfig | None = None) -> dict:
    """Evaluate base and candidate (task metrics, speed, forgetting, leak probe); write ``metrics.json``
    (DVC metrics) and ``details.json``. The answers come from ``evaluate.engine`` (transformers or vLLM);
    the probes score log-probabilities with transformers either way."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = build_task(task_cfg)
    # Written under the sanitize stage's key; another key (or none) would make the probe find nothing, so
    # that stops the stage (DigestKeyMismatch) instead of reporting 0 hits.
    written = [f for f in pii_digest_files if f.is_file() and f.stat().st_size]
    key = digest_key(create=not written)
    digests = read_digests(written, key)
    redactor = redactor or build_redactor()
    rows, slices = _capped(eval_file, cfg)
    prompts = [r["prompt"] for r in rows]
    forgetting = load_chat_file(forgetting_file) if forgetting_file is not None else None
    models = {"base": None, "candidate": adapter_dir}
    engine = _engine(cfg, serve, len(models) * (len(prompts) + len(forgetting or [])))
    gen, fallback = None, ""
    if engine == "vllm":
        # One engine start for every answer the stage needs, before any transformers model takes memory.
        from transformers import AutoTokenizer

        gen = _vllm(base_dir, models, AutoTokenizer.from_pretrained(resolve_base(base_dir)), task_cfg, cfg, serve)
        for name in models:
            gen.add(name, "eval", prompts)
            if forgetting is not None:
                gen.add(name, "forgetting", [r["prompt"] for r in forgetting])
        # vLLM batches every prompt it has: timing only batch_size of them would measure its per-step
        # overhead, where LoRA's extra kernels weigh most (on the H200, eager, 32 prompts: LoRA at 0.34x).
        gen.paired_speed(prompts[:512])
        fallback = _started(gen, cfg)
        if fallback:
            engine, gen = "transformers", None
    results = {}
    loaded = None
    for name, adapter in models.items():
        loaded = _load(base_dir, adapter)
        if gen is not None:
            predictions, speed = gen.answers(name, "eval")
            generated = gen.answers(name, "forgetting")[0] if forgetting is not None else []
        else:
            speed = {}
            predictions = generate(*loaded, prompts, task_cfg, cfg.batch_size, stats=speed)
            generated = (generate(*loaded, [r["prompt"] for r in forgetting], task_cfg, cfg.batch_size)
                         if forgetting is not None else [])
        res = {**score_predictions(task, predictions, rows, slices), "speed": speed}
        extra, continuations = probe_model(*loaded, forgetting, probes, cfg)
        res.update(extra)
        answers = res["predictions"] + generated + continuations
        res.setdefault("leak", {}).update(
            pii_hits=pii_hits(answers, digests, redactor, key), answers_scanned=len(answers),
            redacted_values_known=len(digests))
        results[name] = res
    # The speed the gate compares: both models timed alternately (on vLLM in its run; on transformers with
    # the candidate's peft model, adapter off = the base), so load from other processes cannot favour
    # whichever ran first.
    speeds = gen.speed() if gen is not None else paired_speed(*loaded, prompts, task_cfg, cfg.batch_size)
    for name in ("base", "candidate"):
        results[name]["speed"] = speeds[name]
    metrics = {name: {"n": r["n"], **r["summary"], "tokens_per_s": r["speed"].get("tokens_per_s"),
                      **({"forgetting_accuracy": r["forgetting"]["score"]} if "forgetting" in r else {}),
                      **({"max_canary_exposure": max((c["exposure"] for c in r["leak"]["canaries"]), default=0.0)}
                         if r["leak"].get("canaries") else {}),
                      **({"slices": {k: {"n": v["n"], **v["summary"]} for k, v in r["slices"].items()}}
                         if len(r["slices"]) > 1 else {})}
               for name, r in results.items()}
    generation = {"engine": engine, **({"vllm": gen.result["vllm"], "startup_s": gen.result["startup_s"]}
                                       if gen is not None else {}), **({"vllm_failed": fallback} if fallback else {})}
    write_json(out / "metrics.json", metrics)
    write_json(out / "details.json", {"task": task_cfg.name, "kind": task_cfg.kind, "generation": generation,
                                      **results})
    return metrics
