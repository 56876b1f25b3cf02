"""Synthetic pretraining documents that teach a tiny model to copy and to look values up.

A LoRA adapter has too little capacity to build a copy circuit (induction heads) out of random weights;
the embedded base starts with one (circuits.py), and these documents teach it to use the circuit inside
conversations: answers that repeat a span of the prompt, pick the value of a key out of a list, or
extract an id or a number from a sentence. Spans mix words of the project's own text with random ids,
numbers and names, so the skill is about copying, not about a vocabulary. Deterministic for a seed.
"""

from __future__ import annotations

import random
import string

_COPY = ["Repeat: {x}", "Copy this exactly: {x}", "{x}\nRepeat the text above.", "Say back: {x}",
         "Echo the following.\n{x}"]
_LOOKUP = ["{pairs}\nWhat is the value of {k}?", "{pairs}\n{k} =", "Given:\n{pairs}\nReturn {k}."]
_EXTRACT = ["{before} {label} {v} {after}\nWhat is the {label}?", "{before} {label} {v} {after}\nExtract the {label}."]
_LABELS = ["id", "order", "code", "number", "ticket", "reference", "name", "amount"]
_SYLLABLES = ["ka", "lo", "mi", "ra", "ten", "vo", "shi", "an", "be", "dor", "el", "fi", "gu", "ho", "ja", "nu"]


def _value(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.3:
        return f"{rng.choice(string.ascii_uppercase)}{rng.choice(string.ascii_uppercase)}-{rng.randint(0, 99999):05d}"
    if kind < 0.55:
        return str(rng.randint(0, 10 ** rng.randint(1, 7)))
    if kind < 0.8:
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
    return "".join(rng.choices(string.ascii_lowercase + string.digits, k=rng.randint(3, 8)))


def _span(rng: random.Random, words: list[str]) -> str:
    n = rng.randint(1, 8)
    return " ".join(_value(rng) if rng.random() < 0.4 or not words else rng.choice(words) for _ in range(n))


def conversation(rng: random.Random, words: list[str]) -> list[dict[str, str]]:
    """One synthetic user/assistant exchange whose answer is copied from the prompt."""
    kind = rng.random()
    if kind < 0.4:
        x = _span(rng, words)
        prompt, answer = rng.choice(_COPY).format(x=x), x
    elif kind < 0.7:
        keys = rng.sample(words, k=min(len(words), rng.randint(2, 5))) if len(words) >= 5 else \
            [_value(rng) for _ in range(rng.randint(2, 5))]
        values = [_value(rng) for _ in keys]
        k = rng.randrange(len(keys))
        pairs = "\n".join(f"{a}: {b}" for a, b in zip(keys, values))
        prompt, answer = rng.choice(_LOOKUP).format(pairs=pairs, k=keys[k]), values[k]
    else:
        v, label = _value(rng), rng.choice(_LABELS)
        before = " ".join(rng.choices(words, k=rng.randint(0, 6))) if words else ""
        after = " ".join(rng.choices(words, k=rng.randint(0, 6))) if words else ""
        prompt = rng.choice(_EXTRACT).format(before=before, label=label, v=v, after=after).strip()
        answer = v
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def conversations(n: int, words: list[str], seed: int) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    return [conversation(rng, words) for _ in range(n)]
