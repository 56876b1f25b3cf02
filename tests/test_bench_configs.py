"""The GPU training benchmark's variants are train-stage configurations that validate: a variant that no
longer matches the config (a key moved under train.trl, a new data check) fails here on CPU instead of on
the device, where it cost a whole round of device time (2026-12-03)."""

import argparse
import importlib.util

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("train_gpu", ROOT / "bench/train_gpu.py")
train_gpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_gpu)
STAGE_VARIANTS = [v for v in train_gpu.VARIANTS if not v.startswith("baseline")]


@pytest.mark.parametrize("variant", STAGE_VARIANTS)
def test_every_stage_variant_is_a_valid_train_config(variant, tmp_path):
    args = argparse.Namespace(variant=variant, micro_batch=8, accum=4, max_length=2048, steps=10)
    cfg = train_gpu.stage_config(args, 29_000.0, tmp_path)
    opts = train_gpu.VARIANTS[variant]
    trl = cfg.trl
    assert trl["max_steps"] == 10 and trl["max_length"] == 2048
    # Same tokens per optimizer step as the baseline's 8 x 4 padded rows (packed rows of max_length).
    rows = trl["per_device_train_batch_size"] * trl["gradient_accumulation_steps"]
    if opts.get("packing"):
        assert abs(rows * 0.99 * 2048 - 29_000) <= 0.99 * 2048 * trl["gradient_accumulation_steps"]
    assert trl.get("use_liger_kernel", False) == opts.get("liger_kernels", False)
    assert cfg.adapter == opts.get("adapter", cfg.adapter) and cfg.max_truncated_share == 1.0
