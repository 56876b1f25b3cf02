"""The augment stage: governed, rule-based synthetic records with provenance.

    python -m pipeline augment

Each synthetic record rewrites the last user turn of one clean record and carries ``provenance`` naming
the generator and the parent record. The rules (new greeting, closing, sentence order within a line) keep
the meaning of a free-text chat message, not of a question over a schema or a program, so they run only
where the task says so (``task.chat_rewrites``); otherwise the stage passes the real records through.
Governance: a rewrite never touches the answer or a line break, synthetic records never exceed
``max_synthetic_fraction`` of the real ones, never duplicate a real record, and pass the same PII
redaction as real data. Writes ``train.jsonl`` (real + synthetic) and ``report.json``.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

from pipeline.config import AugmentConfig, TaskConfig
from pipeline.dedup import IntSet, digest64, record_text
from pipeline.pii import Redactor, redact
from pipeline.io import write_json

_GREETINGS = ["Hi team,", "Hello there,", "Dear support,", "Greetings,", "Hi again,"]
_CLOSINGS = ["Thank you.", "Best regards.", "Many thanks in advance.", "Cheers."]
_LEADING_GREETING = re.compile(r"^(hi|hello|hey|dear|good \w+|greetings)[^,.!]{0,20}[,.!]\s*", re.I)


def _swap_greeting(text: str, rng: random.Random) -> str:
    first, sep, rest = text.partition("\n")
    return f"{rng.choice(_GREETINGS)} {_LEADING_GREETING.sub('', first)}{sep}{rest}"


def _add_closing(text: str, rng: random.Random) -> str:
    return f"{text.rstrip(' ')} {rng.choice(_CLOSINGS)}"


def _reorder_sentences(text: str, rng: random.Random) -> str:
    if "\n" in text:  # a multi-line prompt (a list, code, a schema): its order is part of its meaning
        return text
    sentences = re.split(r"(?<=[.!?]) +", _LEADING_GREETING.sub("", text).strip())
    if len(sentences) < 2:
        return text
    rng.shuffle(sentences)
    return " ".join(sentences)


GENERATORS = {"greeting-swap": _swap_greeting, "closing": _add_closing, "reorder": _reorder_sentences}


def augment(clean_file: Path, cfg: AugmentConfig, task: TaskConfig, redactor: Redactor | None = None,
            curated_file: Path | None = None) -> dict:
    """Write ``<out_dir>/train.jsonl``: the clean records, the synthetic rewrites (capped by
    ``max_synthetic_fraction`` of the clean ones) and the curated records from served traffic
    (``curated_file``, sanitized; real data with provenance, never rewritten)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(clean_file, encoding="utf-8") as fh:
        real = [json.loads(line) for line in fh]
    # Exact duplicates only: a rewrite is by design close to its parent, so a near-duplicate test
    # would reject nearly all of them.
    seen = IntSet()
    for r in real:
        seen.add(digest64(record_text(r["messages"])))
    budget = int(len(real) * cfg.max_synthetic_fraction) if cfg.enabled and task.chat_rewrites else 0
    rng = random.Random(cfg.seed)
    synthetic: list[dict] = []
    rejected: Counter[str] = Counter()
    candidates = list(range(len(real)))
    rng.shuffle(candidates)
    for idx in candidates:
        if len(synthetic) >= budget:
            break
        parent = real[idx]
        name = rng.choice(sorted(GENERATORS))
        messages = [dict(m) for m in parent["messages"]]
        user_turn = next(m for m in reversed(messages[:-1]) if m["role"] == "user")
        user_turn_lines = user_turn["content"].count("\n")
        text, found = redact(GENERATORS[name](user_turn["content"], rng), redactor)
        if found:  # a rewrite must never surface PII; placeholders are not re-detected
            rejected["pii"] += 1
            continue
        user_turn["content"] = text
        if messages[-1] != parent["messages"][-1] or text.count("\n") != user_turn_lines:
            raise AssertionError(f"augment rule {name} changed an answer or a line break")  # a bug, not data
        if not seen.add(digest64(record_text(messages))):
            rejected["duplicate"] += 1
            continue
        synthetic.append({"messages": messages, "provenance": {
            "synthetic": True, "generator": f"rule:{name}", "seed": cfg.seed, "parent": parent.get("source")}})
    curated: list[dict] = []
    if curated_file is not None and curated_file.is_file():
        with open(curated_file, encoding="utf-8") as fh:
            curated = [json.loads(line) for line in fh]
    with open(out / "train.jsonl", "w", encoding="utf-8") as fh:
        for rec in real + synthetic + curated:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    report = {
        "real": len(real),
        "synthetic": len(synthetic),
        "curated": len(curated),
        "total": len(real) + len(synthetic) + len(curated),
        "synthetic_fraction": round(len(synthetic) / max(len(real), 1), 4),
        "max_synthetic_fraction": cfg.max_synthetic_fraction,
        "rules": sorted(GENERATORS) if budget else [],
        "why_none": None if budget else ("augment.enabled is false" if not cfg.enabled else
                                         "no rule is safe for this task (task.chat_rewrites is false)"),
        "by_generator": dict(sorted(Counter(r["provenance"]["generator"] for r in synthetic).items())),
        "rejected": dict(rejected),
    }
    write_json(out / "report.json", report)
    return report
