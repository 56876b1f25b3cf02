"""Batched generation with the task's settings (length, stop strings) on the detected device."""

from __future__ import annotations

from pipeline.config import TaskConfig
from pipeline.device import detect


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text before the first stop string (as an OpenAI-compatible server returns it)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut].strip()


def generate(model, tokenizer, prompts: list[list[dict]], task: TaskConfig, batch_size: int) -> list[str]:
    """Greedy answers to chat ``prompts``: the gate's numbers must be reproducible run to run."""
    import torch

    dev = detect()
    model.to(dev.type).eval()
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        batch = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts[i:i + batch_size]]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(dev.type)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=task.max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]
        outputs.extend(cut_at_stop(t, task.stop) for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    return outputs
