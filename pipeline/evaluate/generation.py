"""Batched generation with the task's settings (length, stop strings) on the detected device."""

from __future__ import annotations

from pipeline.config import TaskConfig
from pipeline.device import detect


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text before the first stop string (as an OpenAI-compatible server returns it)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut].strip()


def generate(model, tokenizer, prompts: list[list[dict]], task: TaskConfig, batch_size: int,
             temperature: float = 0.0, seed: int = 0, stats: dict | None = None,
             full_length: bool = False) -> list[str]:
    """Answers to chat ``prompts``: greedy by default (the gate's numbers must be reproducible run to
    run); ``temperature`` > 0 samples with top-p 1.0, as an OpenAI client does by default, seeded.
    ``stats``, when given, receives the generated token count, seconds and tokens/s (the gate's speed
    guardrail). ``full_length`` suppresses the end token until ``task.max_new_tokens``: every answer is
    that long (speed rounds)."""
    import time

    import torch

    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature else \
        {"do_sample": False}
    dev = detect()
    model.to(dev.type).eval()
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    tokens, started = 0, time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts[i:i + batch_size]]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(dev.type)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=task.max_new_tokens, **sampling,
                                 **({"min_new_tokens": task.max_new_tokens} if full_length else {}),
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]
        # Padding after an early end is not generated work; a full-length run has none (a generated token
        # can still be the pad id).
        padded = tokenizer.pad_token_id is not None and not full_length
        tokens += int((new != tokenizer.pad_token_id).sum()) if padded else new.numel()
        outputs.extend(cut_at_stop(t, task.stop) for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    if stats is not None:
        seconds = time.perf_counter() - started
        stats.update(tokens=tokens, seconds=round(seconds, 3), tokens_per_s=round(tokens / max(seconds, 1e-9), 2))
    return outputs


def completion_loss(model, tokenizer, rows: list[dict]) -> float:
    """Mean negative log-likelihood (nats per token) of the reference completions given their prompts:
    how confident the model is in the right answer, which exact match under greedy decoding hides."""
    import torch

    dev = detect()
    model.to(dev.type).eval()
    total, count = 0.0, 0
    for row in rows:  # one row at a time: no padding to mask, and the eval splits are small
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        labels = [-100] * len(p_ids) + ids[len(p_ids):]
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids], device=dev.type),
                        labels=torch.tensor([labels], device=dev.type))
        n = sum(1 for x in labels[1:] if x != -100)
        total += out.loss.item() * n
        count += n
    return total / max(count, 1)


def paired_speed(model, tokenizer, prompts: list[list[dict]], task: TaskConfig, batch_size: int,
                 rounds: int = 3) -> dict[str, dict]:
    """Greedy generation speed of the base (adapter disabled) and of base + adapter, measured alternately on
    the same batch of ``prompts`` with one loaded peft model. Whatever else loads the machine meanwhile (a
    vLLM starting beside the pipeline on a laptop, another job on a shared GPU) slows both alike, so the
    gate's speed guardrail compares like with like instead of whichever model happened to run second.
    Every answer runs to ``task.max_new_tokens`` (end token suppressed): the models' tokens/s are then of
    the same work. With answers of their own lengths a fine-tune that answers in 12 tokens where the base
    rambles to the limit looks slow, because a batch's fixed costs are spread over fewer tokens."""
    batch = prompts[:batch_size]
    totals = {"base": [0, 0.0], "candidate": [0, 0.0]}
    for r in range(rounds):
        for who in (("base", "candidate") if r % 2 == 0 else ("candidate", "base")):
            stats: dict = {}
            if who == "base":
                with model.disable_adapter():
                    generate(model, tokenizer, batch, task, batch_size, stats=stats, full_length=True)
            else:
                generate(model, tokenizer, batch, task, batch_size, stats=stats, full_length=True)
            totals[who][0] += stats["tokens"]
            totals[who][1] += stats["seconds"]
    return {who: {"tokens": t, "seconds": round(s, 3), "tokens_per_s": round(t / max(s, 1e-9), 2),
                  "method": f"paired, {rounds} alternating rounds of {len(batch)} prompts, "
                            f"{task.max_new_tokens} tokens each"}
            for who, (t, s) in totals.items()}
