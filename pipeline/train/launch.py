"""Several processes for the train stage, by configuration (``train.distributed``): the stage's own
command (``python -m pipeline train``, DVC's ``cmd``) starts itself again under torchrun, so DVC, the
flows and every node run the same command. torchrun's elastic agent gives each process its rank; the HF
Trainer picks NCCL on GPUs and gloo on CPUs, DDP unless ``train.trl.fsdp`` asks for FSDP; rank 0 alone
writes the outputs (pipeline/train/trainer.py)."""

from __future__ import annotations

import os
import sys

from pipeline.config import DistributedConfig


def torchrun_args(d: DistributedConfig) -> list[str]:
    """torchrun's options for ``train.distributed`` (one node: standalone; several: c10d rendezvous)."""
    args = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={d.nnodes}",
            f"--nproc-per-node={d.nproc_per_node}"]
    if d.nnodes == 1 and not d.rdzv_endpoint:
        return [*args, "--standalone"]
    return [*args, "--rdzv-backend=c10d", f"--rdzv-endpoint={d.rdzv_endpoint}", f"--rdzv-id={d.rdzv_id}",
            f"--rdzv-conf=join_timeout={d.join_timeout_s}"]


def relaunch(d: DistributedConfig, argv: list[str]) -> list[str] | None:
    """The command to run instead of this one, or None when this process already is a worker (torchrun
    set LOCAL_RANK) or one process was asked for."""
    if d.world_size <= 1 or "LOCAL_RANK" in os.environ:
        return None
    return [*torchrun_args(d), "-m", "pipeline", *argv]
