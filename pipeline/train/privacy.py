"""Differentially private LoRA training (``train.privacy``): DP-SGD through Opacus inside TRL's SFTTrainer.

What the guarantee covers and how (docs/privacy.md):

- **Unit**: one training row (one assistant turn with its context). Each step samples every row
  independently with probability ``q = per_device_train_batch_size / rows`` (Poisson sampling, Opacus'
  ``UniformWithReplacementSampler``), computes each sampled row's gradient on the LoRA parameters alone
  (Opacus' per-sample gradient hooks on peft's ``lora_A``/``lora_B`` linears; the frozen base needs none),
  clips it to ``max_grad_norm`` and adds Gaussian noise of ``noise_multiplier x max_grad_norm`` to the sum
  (Opacus' ``DPOptimizer``). The accountant (RDP or PRV) turns (noise, q, steps taken) into epsilon.
- **Every row is in the mechanism**: the user's records, curated feedback records, synthetic rewrites, the
  generic mix and the planted canaries are sampled, clipped and noised alike, and all count in ``rows``.
  Generic rows are public data, so they cost nothing; canaries are treated as user records (the leak
  probe then measures what the guarantee promises).
- **Records with several rows**: a record with k assistant turns is k rows, and a synthetic rewrite adds
  a row derived from its parent. A record's guarantee is group privacy over its rows:
  (k eps, k e^((k-1) eps) delta), reported as ``record_epsilon`` / ``record_delta`` for the largest k.
- **Loss**: each row's own mean token loss, then the mean over the batch, so a row's gradient depends on
  that row alone (the token-mean over a whole batch would let the other rows scale it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.config import ConfigError, PrivacyConfig, TrainConfig

# TRL switches that change what one training row is, or compute the loss where Opacus cannot see it.
_REFUSED_TRL = {
    "padding_free": "rows would be concatenated into one sequence",
    "use_liger_kernel": "Liger's fused loss never materialises the per-row logits",
    "gradient_accumulation_steps": "the Poisson-sampled batch is the logical batch (raise "
                                   "per_device_train_batch_size instead)",
}


def check_supported(cfg: TrainConfig, world_size: int = 1) -> None:
    """The TRL-level part of what DP training refuses (the config validator covers loraflow's keys)."""
    bad = []
    for key, why in _REFUSED_TRL.items():
        value = cfg.trl_value(key)
        if key == "gradient_accumulation_steps":
            if value not in (None, 1):
                bad.append(f"train.trl.{key}={value}: {why}")
        elif value:
            bad.append(f"train.trl.{key}: {why}")
    if world_size > 1:
        bad.append(f"{world_size} processes: the sampler and the noise are per process; DP training runs on one")
    if bad:
        raise ConfigError("params.yaml: not supported with train.privacy.enabled: " + "; ".join(bad))


def default_delta(rows: int) -> float:
    """Below 1/rows, as DP-SGD requires for a meaningful guarantee."""
    return 1.0 / (10 * max(rows, 1))


def planned_steps(cfg: TrainConfig, rows: int) -> int:
    """The optimizer steps the trainer will take: ``max_steps``, else epochs x (1/q) Poisson batches."""
    max_steps = int(cfg.trl_value("max_steps") or -1)
    if max_steps > 0:
        return max_steps
    per_epoch = max(1, int(1 / sample_rate(cfg, rows)))  # Opacus' sampler: 1/q batches per epoch
    return math.ceil(float(cfg.trl_value("num_train_epochs")) * per_epoch)


def sample_rate(cfg: TrainConfig, rows: int) -> float:
    return min(1.0, int(cfg.trl_value("per_device_train_batch_size")) / max(rows, 1))


def noise_for(priv: PrivacyConfig, q: float, steps: int, delta: float) -> float:
    """The noise multiplier: the configured one, or calibrated so ``steps`` steps spend ``target_epsilon``."""
    if priv.noise_multiplier is not None:
        return float(priv.noise_multiplier)
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=priv.target_epsilon, target_delta=delta, sample_rate=q,
                                      steps=steps, accountant=priv.accountant))


def epsilon_spent(accountant: str, noise: float, q: float, steps: int, delta: float) -> float:
    """Epsilon for ``steps`` DP-SGD steps at (noise, q), by the named Opacus accountant."""
    if steps <= 0:
        return 0.0
    if noise <= 0:
        return math.inf
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(noise, q, steps)]
    return float(acc.get_epsilon(delta=delta))


def rows_per_record(train_file: Path) -> int:
    """The most training rows one user record becomes: its assistant turns, twice when a synthetic
    rewrite of it was added (the augment stage rewrites each parent at most once)."""
    most, synthetic = 1, False
    with open(train_file, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            msgs = rec["messages"]
            first_user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), len(msgs))
            turns = sum(1 for i, m in enumerate(msgs) if m["role"] == "assistant" and i > first_user)
            most = max(most, turns)
            synthetic = synthetic or bool((rec.get("provenance") or {}).get("synthetic"))
    return most * (2 if synthetic else 1)


def group_guarantee(eps: float, delta: float, k: int) -> tuple[float, float]:
    """(eps, delta)-DP per row gives (k eps, k e^((k-1) eps) delta) for a group of k rows."""
    if k <= 1:
        return eps, delta
    return k * eps, min(1.0, k * math.exp((k - 1) * eps) * delta) if math.isfinite(eps) else 1.0


def per_row_loss(model, inputs: dict):
    """Mean over the batch of each row's own mean completion-token loss (labels -100 are not scored)."""
    import torch
    import torch.nn.functional as F

    labels = inputs["labels"]
    kwargs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
    logits = model(**kwargs).logits[:, :-1]
    target = labels[:, 1:]
    tok = F.cross_entropy(logits.float().transpose(1, 2), target.clamp(min=0), reduction="none")
    mask = (target != -100).to(tok.dtype)
    per_row = (tok * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return per_row.mean() if per_row.numel() else torch.zeros((), requires_grad=True)


def make_dp_trainer(base_cls, priv: PrivacyConfig, *, rows: int, seed: int, noise_multiplier: float,
                    sample_rate: float):
    """``base_cls`` (TRL's SFTTrainer) with DP-SGD: Poisson batches at ``sample_rate``, per-row loss, Opacus'
    per-sample gradients on the trainable (LoRA) parameters and its clip-and-noise optimizer."""
    import torch
    from torch.utils.data import DataLoader

    class DPTrainer(base_cls):
        def get_train_dataloader(self):
            from opacus.utils.uniform_sampler import UniformWithReplacementSampler

            dataset = self._remove_unused_columns(self.train_dataset, description="Training")
            collate = self.data_collator

            def collate_or_empty(batch):
                # A Poisson batch can be empty: the step still happens (and is accounted), with no gradient.
                if batch:
                    return collate(batch)
                none = torch.zeros((0, 1), dtype=torch.long)
                return {"dp_empty": torch.zeros(0), "input_ids": none, "attention_mask": none, "labels": none}

            gen = torch.Generator().manual_seed(seed)
            sampler = UniformWithReplacementSampler(num_samples=len(dataset), sample_rate=sample_rate,
                                                    generator=gen)
            return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_or_empty, num_workers=0)

        def create_optimizer(self, *args, **kwargs):
            from opacus import GradSampleModule
            from opacus.optimizers import DPOptimizer

            opt = super().create_optimizer(*args, **kwargs)
            if not isinstance(opt, DPOptimizer):
                # The hooks live on the LoRA linears themselves, so the trainer keeps the peft model (saving,
                # evaluation) while Opacus records per-sample gradients of every trainable parameter.
                self._grad_sample_module = GradSampleModule(self.model, batch_first=True, loss_reduction="mean")
                self.optimizer = DPOptimizer(opt, noise_multiplier=noise_multiplier,
                                             max_grad_norm=priv.max_grad_norm,
                                             expected_batch_size=max(1, round(sample_rate * rows)),
                                             loss_reduction="mean")
            return self.optimizer

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = per_row_loss(model, inputs)
            return (loss, None) if return_outputs else loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            opt = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper holds Opacus'
            # The trainer zeroes the model's gradients, not the optimizer's per-sample ones; Opacus refuses
            # to step on stale ones (one optimizer step per batch: no accumulation under DP).
            opt.zero_grad(set_to_none=True)
            if "dp_empty" in inputs:
                for p in opt.params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                return torch.zeros((), device=self.args.device)
            return super().training_step(model, inputs, num_items_in_batch)

    return DPTrainer


def privacy_report(priv: PrivacyConfig, *, noise: float, q: float, steps: int, delta: float, rows: int,
                   k: int, planned: int) -> dict:
    """What ``train_metrics.json``, MLflow, the model card and the dossier record about the guarantee."""
    eps = epsilon_spent(priv.accountant, noise, q, steps, delta)
    rec_eps, rec_delta = group_guarantee(eps, delta, k)
    return {
        "epsilon": round(eps, 4) if math.isfinite(eps) else None,
        "delta": delta,
        "accountant": priv.accountant,
        "noise_multiplier": round(noise, 6),
        "max_grad_norm": priv.max_grad_norm,
        "sample_rate": round(q, 6),
        "steps": steps,
        "planned_steps": planned,
        "target_epsilon": priv.target_epsilon,
        "rows": rows,
        "unit": "training row (one assistant turn with its context)",
        "rows_per_record_max": k,
        "record_epsilon": round(rec_eps, 4) if math.isfinite(rec_eps) else None,
        "record_delta": rec_delta,
        "library": "opacus",
    }
