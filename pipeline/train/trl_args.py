"""``train.trl``: TRL's own ``SFTConfig`` / ``DPOConfig`` settings, passed through and checked against the
installed TRL, merged over loraflow's defaults (``TRL_DEFAULTS``) and the settings loraflow derives itself
(device, checkpoint folder, evaluation schedule, data-loader details).

Any field of the installed TRL's config class is reachable without a loraflow release; a misspelt key is
an error naming it (and the closest real field), checked before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

from pipeline.config import DPO_DEFAULTS, TRL_DEFAULTS, ConfigError, TrainConfig


def config_class(cfg: TrainConfig):
    if cfg.method == "dpo":
        from trl import DPOConfig

        return DPOConfig
    from trl import SFTConfig

    return SFTConfig


def check_trl_keys(cfg: TrainConfig, source: str = "params.yaml") -> None:
    """Every ``train.trl`` key must be a field of the installed TRL's config class for ``train.method``."""
    import trl

    cls = config_class(cfg)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in cfg.trl if k not in fields]
    if unknown:
        lines = []
        for key in unknown:
            near = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            lines.append(f"{source}: train.trl.{key}: not a field of TRL {trl.__version__}'s {cls.__name__}{hint}")
        raise ConfigError("\n".join(lines))


def training_args(cfg: TrainConfig, ckpt_dir: Path, has_eval: bool, dev, source: str = "params.yaml"):
    """The TRL config object for this run: loraflow's defaults, then ``train.trl``, then what loraflow owns."""
    check_trl_keys(cfg, source)
    workers = int(cfg.trl_value("dataloader_num_workers") or 0)
    derived: dict[str, Any] = {
        # Follow the user's training values unless they set these too.
        "per_device_eval_batch_size": cfg.trl_value("per_device_train_batch_size"),
        "eval_steps": cfg.trl_value("save_steps"),
        "data_seed": cfg.seed,
        "eval_strategy": "steps" if has_eval else "no",
        "bf16": dev.bf16,
        # Batches collated ahead in worker processes into pinned memory, copied without blocking.
        "dataloader_persistent_workers": workers > 0,
        "dataloader_prefetch_factor": 4 if workers else None,
        "dataloader_pin_memory": dev.is_cuda,
        "accelerator_config": {"non_blocking": dev.is_cuda and workers > 0},
    }
    owned: dict[str, Any] = {
        "output_dir": str(ckpt_dir),
        "use_cpu": not dev.is_cuda,
        "save_strategy": "steps",
        "include_num_input_tokens_seen": "non_padding",
        "load_best_model_at_end": cfg.early_stopping_patience > 0,
        "metric_for_best_model": "eval_loss",
    }
    if cfg.method == "sft":
        owned["packing"] = cfg.packing
    if cfg.privacy.enabled:
        owned["max_grad_norm"] = 0.0  # Opacus clips each example's gradient; a second clip of the noised sum would bias it
    defaults = {**TRL_DEFAULTS, **(DPO_DEFAULTS if cfg.method == "dpo" else {})}
    if "gradient_checkpointing" in cfg.trl:  # transformers' older name for it: the user's value must win
        defaults.pop("activation_checkpointing")
    kwargs = {**defaults, **derived, **cfg.trl, **owned}
    if kwargs.get("greater_is_better") is None:
        kwargs["greater_is_better"] = False  # eval_loss: lower is better
    try:
        return config_class(cfg)(**kwargs)
    except (TypeError, ValueError) as err:  # TRL/transformers' own checks of the combined values
        raise ConfigError(f"{source}: train.trl: TRL rejected the settings: {err}") from None
