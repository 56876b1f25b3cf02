"""The train stage: TRL ``SFTTrainer`` (or ``DPOTrainer``) with a peft LoRA / DoRA / QLoRA adapter.

    python -m pipeline train

Writes the adapter (safetensors) to ``train.out_dir`` with ``train_metrics.json`` (loss curves, duration,
tokens/s, peak memory, GPU-hours, estimated cost) and ``train_meta.json`` (resolved config, input
hashes). Checkpoints go to ``train.checkpoint_dir/<run key>`` every ``checkpoint_steps``; a run killed at
any point resumes from its last checkpoint when started again with the same config and inputs (the
flow's retry does exactly that), and the checkpoints are removed once the adapter is written.
"""

from __future__ import annotations

import hashlib
import json
import random
import resource
import shutil
import time
from pathlib import Path

from pipeline.canaries import Canary
from pipeline.config import TRL_DEFAULTS, TrainConfig
from pipeline.device import detect
from pipeline.hashing import file_sha256
from pipeline.io import write_json
from pipeline.modeling import base_config_sha256, base_weights_sha256, load_base
from pipeline.pii import mask_secrets
from pipeline.train import continual, privacy
from pipeline.train.trl_args import check_trl_keys, training_args


def load_preference_file(path: Path) -> list[dict]:
    """DPO rows from the sanitized preference split (``{"prompt": [...], "chosen": str, "rejected": str}``)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            rows.append({"prompt": rec["prompt"], "chosen": [{"role": "assistant", "content": rec["chosen"]}],
                         "rejected": [{"role": "assistant", "content": rec["rejected"]}]})
    return rows


def load_turn_rows(path: Path) -> list[dict]:
    """Training rows of a sanitized chat file: one prompt-completion row per assistant turn (its context as
    the prompt), so every assistant turn of a conversation is trained on, not only the last. The loss is
    on the completion only (TRL's prompt-completion format), the same mask assistant-only loss gives,
    with any chat template (no generation markers needed)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            msgs = json.loads(line)["messages"]
            first_user = next(i for i, m in enumerate(msgs) if m["role"] == "user")
            rows += [{"prompt": msgs[:i], "completion": [m]} for i, m in enumerate(msgs)
                     if m["role"] == "assistant" and i > first_user]
    return rows


def fit_to_length(rows: list[dict], tokenizer, max_length: int | None) -> tuple[list[dict], dict]:
    """Rows whose completion has at least one token within ``max_length``, and counts: ``truncated`` (the
    completion is cut) and ``dropped`` (no completion token fits: TRL would train on it with zero loss, or
    drop it unsaid). Counted with the chat template the trainer applies."""
    if not max_length or not rows:
        return rows, {"rows": len(rows), "truncated": 0, "dropped": 0}
    def length(messages: list[dict], **kw) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])

    kept, truncated, dropped = [], 0, 0
    for row in rows:
        prompt = length(row["prompt"], add_generation_prompt=True)
        if prompt >= max_length:
            dropped += 1
            continue
        full = length(row["prompt"] + row["completion"])
        truncated += full > max_length
        kept.append(row)
    return kept, {"rows": len(rows), "truncated": truncated, "dropped": dropped}


def check_fit(fit: dict, cfg: TrainConfig) -> None:
    """Stop when more than ``train.max_truncated_share`` of the completions do not fit ``max_length``."""
    bad = fit["truncated"] + fit["dropped"]
    if fit["rows"] and bad / fit["rows"] > cfg.max_truncated_share:
        raise ValueError(
            f"train.trl.max_length={cfg.trl_value('max_length')}: {bad} of {fit['rows']} training completions "
            f"({bad / fit['rows']:.1%}) do not fit ({fit['dropped']} not at all, {fit['truncated']} cut); raise "
            f"train.trl.max_length, shorten the records, or allow more with train.max_truncated_share "
            f"(now {cfg.max_truncated_share})")
    if bad:
        print(f"train: {fit['truncated']} completion(s) cut at max_length {cfg.trl_value('max_length')}, "
              f"{fit['dropped']} left out (no completion token fits)")


def mix_generic(rows: list[dict], generic_file: Path, fraction: float, seed: int) -> tuple[list[dict], int]:
    """Add generic rows so they make up ``fraction`` of the result (as far as the file allows)."""
    if fraction <= 0:
        return rows, 0
    generic = load_turn_rows(generic_file)
    want = round(fraction * len(rows) / (1 - fraction))
    picked = random.Random(seed).sample(generic, min(want, len(generic)))
    mixed = rows + picked
    random.Random(seed + 1).shuffle(mixed)
    return mixed, len(picked)


def plant(rows: list[dict], planted: list[dict], seed: int) -> list[dict]:
    """``rows`` with ``planted`` rows at seeded random positions (not all at the end, where the last
    steps' learning rate is lowest)."""
    if not planted:
        return rows
    out = list(rows)
    rng = random.Random(f"plant:{seed}")
    for row in planted:
        out.insert(rng.randrange(len(out) + 1), row)
    return out


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, use_dora=cfg.adapter == "dora", task_type="CAUSAL_LM")


def attention_implementation(cfg: TrainConfig) -> str:
    """The transformers ``attn_implementation`` for this run (``train.attention``, resolved for the device)."""
    from pipeline.train import attention

    choice = cfg.attention
    if choice == "auto":
        choice = "varlen" if cfg.packing and attention.varlen_available() else "sdpa"
    if choice == "varlen":
        if not attention.varlen_available():
            raise ValueError("train.attention: varlen needs CUDA and torch >= 2.10 (torch.nn.attention.varlen)")
        return attention.register()
    return choice


class _LossRecorder:
    """Collects the trainer's log lines so the loss curves can be stored next to the adapter."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        records = self.records = []

        class _CB(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kw):
                if logs:
                    records.append({"step": state.global_step, **logs})

        self.callback = _CB()


def run_key(cfg: TrainConfig, inputs: list[Path], base_dir: Path, planted: list[dict] = ()) -> str:
    """Identifies a training run: same config, inputs and base -> same checkpoints to resume."""
    h = hashlib.sha256(json.dumps(cfg.model_dump(exclude={"out_dir", "merge_export", "gpu_hour_price"}),
                                  sort_keys=True).encode())
    h.update(json.dumps(list(planted), sort_keys=True).encode())
    for p in inputs:
        h.update(file_sha256(p).encode())
    h.update(base_config_sha256(base_dir).encode())
    h.update(base_weights_sha256(base_dir).encode())
    return h.hexdigest()[:16]


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    found = [p for p in ckpt_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[1]), default=None)


def private_trainer(trainer_cls, cfg: TrainConfig, *, rows: int, train_file: Path, world_size: int):
    """The DP-SGD trainer class and the accounting inputs (``train.privacy``; pipeline/train/privacy.py)."""
    privacy.check_supported(cfg, world_size)
    delta = cfg.privacy.delta or privacy.default_delta(rows)
    q = privacy.sample_rate(cfg, rows)
    planned = privacy.planned_steps(cfg, rows)
    noise = privacy.noise_for(cfg.privacy, q, planned, delta)
    dp = {"noise": noise, "q": q, "delta": delta, "rows": rows, "planned": planned,
          "k": privacy.rows_per_record(train_file)}
    cls = privacy.make_dp_trainer(trainer_cls, cfg.privacy, rows=rows, seed=cfg.seed, noise_multiplier=noise,
                                  sample_rate=q)
    print(f"train: DP-SGD over {rows} rows, sampling rate {q:.4f}, {planned} steps, noise multiplier "
          f"{noise:.3f}, clipping {cfg.privacy.max_grad_norm} ({cfg.privacy.accountant} accountant, delta {delta:.2e})")
    return cls, dp


def train(cfg: TrainConfig, base_dir: Path, train_file: Path, eval_file: Path | None = None,
          preference_file: Path | None = None, extra_callbacks: list | None = None,
          generic_file: Path | None = None, canaries: list[Canary] = (), init_adapter: Path | None = None) -> dict:
    """Fine-tune an adapter; returns the metrics written to ``train_metrics.json``.

    ``eval_file`` is the validation split carved from the training data (early stopping, checkpoint
    selection); the held-out split the gate scores never reaches training. ``generic_file``: sanitized
    generic chat mixed in at ``cfg.generic_fraction``. ``canaries``: the leak probe's secrets, added to
    the in-memory training rows only (outputs record their hashes, never their values). ``init_adapter``:
    the champion's adapter to continue from (``train.continual``), else a fresh adapter.
    """
    import torch
    from datasets import Dataset
    from transformers import EarlyStoppingCallback

    check_trl_keys(cfg)  # before loading anything
    if cfg.early_stopping_patience and eval_file is None:
        raise ValueError("train.early_stopping_patience needs a validation split (data.validation_fraction > 0)")
    if cfg.method == "dpo" and preference_file is None:
        raise ValueError("train.method: dpo needs data.preference (prompt/chosen/rejected JSONL)")
    out = Path(cfg.out_dir)
    dev = detect()
    torch.manual_seed(cfg.seed)
    inputs = [p for p in (train_file, eval_file, preference_file) if p]
    if cfg.generic_fraction and generic_file:
        inputs.append(generic_file)
    planted = [c.chat_row() for c in canaries]
    # Starting from another champion is another run (its weights are an input).
    init = sorted(Path(init_adapter).glob("*.safetensors")) if init_adapter else []
    ckpt_dir = Path(cfg.checkpoint_dir) / run_key(cfg, inputs + init, base_dir, planted)
    resume = last_checkpoint(ckpt_dir)
    if resume:
        print(f"train: resuming from {resume}")
    model, tokenizer = load_base(base_dir, quantize_4bit=cfg.adapter == "qlora",
                                 attn_implementation=attention_implementation(cfg), fsdp=cfg.fsdp)
    peft_config = lora_config(cfg)
    if init_adapter is not None:
        model, peft_config = continual.load_champion(model, Path(init_adapter), cfg), None
        print(f"train: continuing from the champion's adapter {init_adapter}")
    eval_rows = load_turn_rows(eval_file) if eval_file else None
    recorder = _LossRecorder()
    callbacks = [recorder.callback, *(extra_callbacks or [])]
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    n_generic = 0
    fit = {"rows": 0, "truncated": 0, "dropped": 0}
    dp = None
    use_ewc = bool(init_adapter and cfg.continual.ewc_lambda)  # the config refuses it with dpo and with privacy
    if cfg.method == "sft":
        from trl import SFTTrainer

        rows = load_turn_rows(train_file)
        if cfg.generic_fraction and generic_file is not None:
            rows, n_generic = mix_generic(rows, generic_file, cfg.generic_fraction, cfg.seed)
        rows, fit = fit_to_length(rows, tokenizer, cfg.trl_value("max_length"))
        check_fit(fit, cfg)
        rows = plant(rows, planted, cfg.seed)
        args = training_args(cfg, ckpt_dir, bool(eval_rows), dev)
        trainer_cls = continual.make_ewc_trainer(SFTTrainer) if use_ewc else SFTTrainer
        if cfg.privacy.enabled:
            trainer_cls, dp = private_trainer(SFTTrainer, cfg, rows=len(rows), train_file=train_file,
                                              world_size=args.world_size)
        trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
                             processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    else:
        from trl import DPOTrainer

        rows = plant(load_preference_file(preference_file), [c.preference_row() for c in canaries], cfg.seed)
        split = max(1, len(rows) // 10) if cfg.early_stopping_patience or eval_file else 0
        train_rows, dpo_eval = (rows[split:], rows[:split]) if split else (rows, None)
        args = training_args(cfg, ckpt_dir, bool(dpo_eval), dev)
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                             eval_dataset=Dataset.from_list(dpo_eval) if dpo_eval else None,
                             processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    fisher_source = None
    if use_ewc:  # anchor on the champion's weights
        fisher = continual.load_fisher(Path(init_adapter))
        fisher_source = "champion"
        if fisher is None:
            print("train: the champion has no Fisher information stored (trained without train.continual); "
                  f"estimating it on {min(cfg.continual.fisher_samples, len(rows))} of today's training rows")
            fisher, fisher_source = continual.estimate_fisher(trainer, cfg.continual.fisher_samples, cfg.seed), "estimated at start"
        anchor = {k: p.detach().float().clone() for k, p in continual.trainable(trainer.model).items()}
        trainer.ewc = continual.ewc_state(anchor, fisher, cfg.continual.ewc_lambda)
    if cfg.fused:
        from pipeline.train.fused_lora import fuse_lora_layers

        print(f"train: fused LoRA path on {fuse_lora_layers(trainer.model)} layers")
    if dev.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    # peft casts every LoRA input to the adapter's float32 before its matmuls, and bf16 autocast (on in
    # the trainer's forward) casts it straight back: two full copies of each projection input for nothing.
    from peft.helpers import disable_input_dtype_casting

    with disable_input_dtype_casting(trainer.model, active=dev.bf16):
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    duration = time.perf_counter() - started
    if not trainer.is_world_process_zero():  # under torchrun/accelerate only rank 0 writes the outputs
        return {}
    trainer.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if cfg.continual.from_champion and cfg.method == "sft":  # for the version after this one
        n_fisher = min(cfg.continual.fisher_samples, len(rows))
        print(f"train: estimating the Fisher information on {n_fisher} training rows")
        continual.save_fisher(continual.estimate_fisher(trainer, cfg.continual.fisher_samples, cfg.seed), out,
                              {"samples": n_fisher, "seed": cfg.seed})
    if cfg.merge_export:
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(out / "merged", safe_serialization=True)
        tokenizer.save_pretrained(out / "merged")

    n_tokens = int(trainer.state.num_input_tokens_seen or 0)
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if dev.is_cuda
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    gpu_hours = duration / 3600 * trainer.args.world_size if dev.is_cuda else 0.0
    history = recorder.records
    train_losses = [r for r in history if "loss" in r]
    eval_losses = [r for r in history if "eval_loss" in r]
    metrics = {
        "method": cfg.method,
        "adapter": cfg.adapter,
        "train_loss": float(result.training_loss),
        "final_loss": train_losses[-1]["loss"] if train_losses else None,
        "eval_loss": eval_losses[-1]["eval_loss"] if eval_losses else None,
        "best_eval_loss": trainer.state.best_metric,
        "steps": int(result.global_step),
        "max_steps": int(trainer.state.max_steps),
        "stopped_early": bool(cfg.early_stopping_patience) and trainer.state.global_step < trainer.state.max_steps,
        "resumed_from_step": int(resume.name.split("-")[1]) if resume else 0,
        "epochs": float(trainer.state.epoch or 0),
        "duration_s": round(duration, 2),
        "train_samples": len(rows),
        "completions_truncated": fit["truncated"],  # cut at train.trl.max_length
        "completions_left_out": fit["dropped"],  # no completion token within max_length
        "generic_samples": n_generic,
        "canaries": sorted({c.digest for c in canaries}),  # sha256 prefixes; the values stay out of outputs
        "canary_rows": len(planted),
        "tokens_seen": n_tokens,
        "tokens_per_s": round(n_tokens / duration, 1) if n_tokens else None,
        "peak_memory_mb": round(peak_mb, 1),
        "gpu_hours": round(gpu_hours, 5),
        "estimated_cost": round(gpu_hours * cfg.gpu_hour_price, 4),
        "device": dev.type,
        "device_name": dev.name,
        "threads": torch.get_num_threads(),
        "continual": {"from": str(init_adapter) if init_adapter else None, "ewc_lambda": cfg.continual.ewc_lambda,
                      "fisher_source": fisher_source} if cfg.continual.from_champion else None,
        "privacy": privacy.privacy_report(cfg.privacy, steps=int(result.global_step), **dp) if dp else None,
        "loss_curve": [{"step": r["step"], "loss": r["loss"]} for r in train_losses],
        "eval_loss_curve": [{"step": r["step"], "eval_loss": r["eval_loss"]} for r in eval_losses],
    }
    write_json(out / "train_metrics.json", metrics)
    write_json(out / "train_meta.json", {
        "config": mask_secrets(cfg.model_dump()),  # train.trl may hold hub_token
        # What TRL ran with for every setting loraflow defaults or the user gave (train.trl over TRL_DEFAULTS).
        "trl": mask_secrets({k: getattr(trainer.args, k, None) for k in sorted({*TRL_DEFAULTS, *cfg.trl})}),
        "base_model_dir": str(base_dir),
        "inputs": {str(p): file_sha256(p) for p in inputs},
        "base_config_sha256": base_config_sha256(base_dir),
        "base_weights_sha256": base_weights_sha256(base_dir),
        "run_key": ckpt_dir.name,
    })
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # only needed to resume this run, which is done
    return metrics
