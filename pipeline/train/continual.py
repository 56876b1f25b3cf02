"""Continual training (``train.continual``): the next version starts from the champion's adapter, with an
elastic weight consolidation (EWC) penalty that holds the LoRA parameters the champion's data relied on.

- **Fisher information**: the diagonal empirical Fisher of the LoRA parameters, ``mean_i (d loss_i /
  d theta)^2`` over ``fisher_samples`` training rows (each row's own mean token loss), estimated when an
  adapter finishes training on its own training rows and stored beside it as ``fisher.safetensors``.
  A champion trained before this was switched on has none: it is then estimated at the start, with the
  champion's weights, on today's training rows (which hold the champion's data plus what came since),
  and the train report says so.
- **Penalty**: ``ewc_lambda / 2 * sum_j F_j / mean(F) * (theta_j - theta*_j)^2`` with theta* the
  champion's weights. Dividing by the mean Fisher makes ``ewc_lambda`` comparable across models and data.
"""

from __future__ import annotations

import random
from pathlib import Path

from pipeline.config import ConfigError, TrainConfig

FISHER_FILE = "fisher.safetensors"


def _key(name: str) -> str:
    """A trainable parameter's name without the adapter's name (peft inserts ``.default``)."""
    return name.replace(".default", "")


def trainable(model) -> dict:
    return {_key(n): p for n, p in model.named_parameters() if p.requires_grad}


def load_champion(model, adapter_dir: Path, cfg: TrainConfig):
    """``model`` with the champion's adapter loaded as the trainable starting point. The champion's LoRA
    shape must be this run's (the penalty compares parameter by parameter)."""
    import json

    from peft import PeftModel

    theirs = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    ours = {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "use_dora": cfg.adapter == "dora"}
    diff = [f"train.{'lora_r' if k == 'r' else 'adapter' if k == 'use_dora' else k}: this run {v!r}, champion "
            f"{theirs.get(k)!r}" for k, v in ours.items() if theirs.get(k, False if k == "use_dora" else None) != v]
    if diff:
        raise ConfigError("train.continual.from_champion: the champion's adapter has another shape ("
                          + "; ".join(diff) + "); train from scratch (from_champion: false) or match it")
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)


def estimate_fisher(trainer, samples: int, seed: int) -> dict:
    """The diagonal empirical Fisher of the trainable parameters over ``samples`` of the trainer's rows."""
    import torch

    from pipeline.train.privacy import per_row_loss

    model = trainer.model
    dataset = trainer._remove_unused_columns(trainer.train_dataset, description="Training")
    picked = random.Random(f"fisher:{seed}").sample(range(len(dataset)), min(samples, len(dataset)))
    params = trainable(model)
    fisher = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it will serve
    for i in picked:
        inputs = trainer._prepare_inputs(trainer.data_collator([dataset[i]]))
        model.zero_grad(set_to_none=True)
        per_row_loss(model, inputs).backward()
        for k, p in params.items():
            if p.grad is not None:
                fisher[k] += p.grad.detach().float() ** 2
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {k: (v / max(len(picked), 1)).contiguous() for k, v in fisher.items()}


def save_fisher(fisher: dict, out: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    save_file(fisher, str(out / FISHER_FILE), metadata={k: str(v) for k, v in meta.items()})


def load_fisher(adapter_dir: Path) -> dict | None:
    path = adapter_dir / FISHER_FILE
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(path))


def make_ewc_trainer(base_cls):
    """``base_cls`` with ``ewc_lambda / 2 * sum F/mean(F) (theta - anchor)^2`` added to its loss once
    ``trainer.ewc = {"anchor", "fisher", "lambda"}`` is set (after construction: estimating a missing
    Fisher needs the trainer's own data pipeline)."""
    import torch

    class EWCTrainer(base_cls):
        ewc: dict | None = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            loss, rest = (out[0], out[1]) if return_outputs else (out, None)
            if self.ewc and self.ewc["scale"]:
                fisher, anchor = self.ewc["fisher"], self.ewc["anchor"]
                penalty = torch.zeros((), device=loss.device)
                for k, p in trainable(model).items():
                    if k in fisher:
                        f = fisher[k].to(p.device)
                        penalty = penalty + (f * (p.float() - anchor[k].to(p.device)) ** 2).sum()
                loss = loss + self.ewc["lambda"] / 2 * self.ewc["scale"] * penalty
            return (loss, rest) if return_outputs else loss

    return EWCTrainer


def ewc_state(anchor: dict, fisher: dict, ewc_lambda: float) -> dict:
    total = sum(float(f.sum()) for f in fisher.values())
    count = sum(f.numel() for f in fisher.values())
    missing = sorted(set(anchor) - set(fisher))
    if missing:
        raise ValueError(f"the champion's {FISHER_FILE} has no entry for {len(missing)} trainable parameters "
                         f"(first: {missing[0]}): it belongs to another adapter shape")
    return {"anchor": anchor, "fisher": fisher, "lambda": ewc_lambda, "scale": count / total if total > 0 else 0.0}
