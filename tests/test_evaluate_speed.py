"""The gate's speed numbers are measured paired: base and candidate alternate on one loaded peft model."""

from __future__ import annotations

import json


def test_paired_speed_times_the_base_with_the_adapter_off(tiny_base, clean_demo):
    import torch
    from peft import LoraConfig, get_peft_model

    from pipeline.config import TaskConfig
    from pipeline.evaluate.generation import generate, paired_speed
    from pipeline.modeling import load_base

    model, tok = load_base(tiny_base)
    prompts = [json.loads(x)["messages"][:-1] for x in (clean_demo / "eval/clean.jsonl").read_text().splitlines()[:4]]
    task = TaskConfig(kind="text", max_new_tokens=8)
    plain = generate(model, tok, prompts, task, 4)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():  # a visible adapter: the candidate's answers differ from the base's
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    with peft_model.disable_adapter():
        assert generate(peft_model, tok, prompts, task, 4) == plain  # "base" really is the base
    assert generate(peft_model, tok, prompts, task, 4) != plain
    speeds = paired_speed(peft_model, tok, prompts, task, 4, rounds=2)
    assert set(speeds) == {"base", "candidate"}
    for s in speeds.values():
        assert s["tokens_per_s"] > 0 and s["method"].startswith("paired, 2 alternating")
        # Both models do the same work whatever they answer: every answer runs to max_new_tokens.
        assert s["tokens"] == 2 * len(prompts) * task.max_new_tokens
