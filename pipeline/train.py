"""The train stage: TRL ``SFTTrainer`` with a peft LoRA adapter on the base model.

    python -m pipeline train

Reads chat records, trains on the assistant answers only (prompt-completion format), and writes the
adapter (safetensors) to ``train.out_dir`` together with ``train_metrics.json`` (loss curve, duration,
tokens/s, peak memory) and ``train_meta.json`` (the resolved config and the hashes of the inputs), so
every adapter says what produced it.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

from pipeline.config import TrainConfig
from pipeline.device import detect
from pipeline.hashing import file_sha256
from pipeline.jsonio import write_json


def load_chat_file(path: Path) -> list[dict]:
    """Prompt-completion rows from a clean chat JSONL (last assistant turn = completion)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            msgs = json.loads(line)["messages"]
            rows.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
    return rows


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )


def load_base(base_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = detect()
    dtype = torch.bfloat16 if dev.bf16 else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    return model, tokenizer


class _LossRecorder:
    """Collects the trainer's log lines so the loss curve can be stored next to the adapter."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        records = self.records = []

        class _CB(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kw):
                if logs:
                    records.append({"step": state.global_step, **logs})

        self.callback = _CB()


def train(cfg: TrainConfig, base_dir: Path, train_file: Path, eval_file: Path | None = None) -> dict:
    """Fine-tune a LoRA adapter; returns the metrics written to ``train_metrics.json``."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    out = Path(cfg.out_dir)
    dev = detect()
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_base(base_dir)
    train_rows = load_chat_file(train_file)
    eval_rows = load_chat_file(eval_file) if eval_file else None
    args = SFTConfig(
        output_dir=str(out / "checkpoints"),
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.max_length,
        activation_checkpointing=cfg.gradient_checkpointing,
        seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        eval_strategy="epoch" if eval_rows else "no",
        save_strategy="no",
        report_to="none",
        use_cpu=not dev.is_cuda,
        bf16=dev.bf16,
        dataloader_num_workers=0,
        disable_tqdm=False,
        include_num_input_tokens_seen="non_padding",
    )
    recorder = _LossRecorder()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
        callbacks=[recorder.callback],
    )
    if dev.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = trainer.train()
    duration = time.perf_counter() - started
    trainer.model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    n_tokens = int(trainer.state.num_input_tokens_seen or 0)
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if dev.is_cuda
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    history = recorder.records
    train_losses = [r for r in history if "loss" in r]
    eval_losses = [r for r in history if "eval_loss" in r]
    metrics = {
        "train_loss": float(result.training_loss),
        "final_loss": train_losses[-1]["loss"] if train_losses else None,
        "eval_loss": eval_losses[-1]["eval_loss"] if eval_losses else None,
        "steps": int(result.global_step),
        "epochs": float(trainer.state.epoch or 0),
        "duration_s": round(duration, 2),
        "train_samples": len(train_rows),
        "tokens_seen": n_tokens,
        "tokens_per_s": round(n_tokens / duration, 1) if n_tokens else None,
        "peak_memory_mb": round(peak_mb, 1),
        "device": dev.type,
        "threads": torch.get_num_threads(),
        "loss_curve": [{"step": r["step"], "loss": r["loss"]} for r in train_losses],
        "eval_loss_curve": [{"step": r["step"], "eval_loss": r["eval_loss"]} for r in eval_losses],
    }
    write_json(out / "train_metrics.json", metrics)
    meta = {
        "config": cfg.model_dump(),
        "base_model_dir": str(base_dir),
        "inputs": {str(p): file_sha256(p) for p in [train_file, eval_file] if p},
        "base_config_sha256": file_sha256(base_dir / "config.json"),
    }
    write_json(out / "train_meta.json", meta)
    _drop_checkpoints(out / "checkpoints")
    return metrics


def _drop_checkpoints(path: Path) -> None:
    # Checkpoints are only for resuming a killed run; the adapter itself is the stage's output.
    import shutil

    if path.exists() and not os.environ.get("LORAFLOW_KEEP_CHECKPOINTS"):
        shutil.rmtree(path)
