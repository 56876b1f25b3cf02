"""Detect the compute device once per process; every stage asks here instead of threading flags."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Device:
    type: str  # "cuda" or "cpu"
    name: str
    bf16: bool

    @property
    def is_cuda(self) -> bool:
        return self.type == "cuda"


@lru_cache(maxsize=1)
def detect() -> Device:
    import torch

    if torch.cuda.is_available():
        return Device("cuda", torch.cuda.get_device_name(0), torch.cuda.is_bf16_supported())
    return Device("cpu", "cpu", False)
