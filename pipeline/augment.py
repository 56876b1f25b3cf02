"""The augment stage: governed, rule-based synthetic records with provenance.

    python -m pipeline augment

Each synthetic record is a label-preserving rewrite of one clean record (new greeting, closing or
sentence order) and carries ``provenance`` naming the generator and the parent record. Governance
rules: synthetic records never exceed ``max_synthetic_fraction`` of the real ones, never duplicate a real
record, and pass the same PII redaction as real data. Writes ``train.jsonl`` (real + synthetic) and
``report.json``.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

from pipeline.config import AugmentConfig
from pipeline.jsonio import write_json
from pipeline.pii import redact
from pipeline.dedup import Deduplicator
from pipeline.sanitize import record_text

_GREETINGS = ["Hi team,", "Hello there,", "Dear support,", "Greetings,", "Hi again,"]
_CLOSINGS = ["Thank you.", "Best regards.", "Many thanks in advance.", "Cheers."]
_LEADING_GREETING = re.compile(r"^(hi|hello|hey|dear|good \w+|greetings)[^,.!]{0,20}[,.!]\s*", re.I)


def _swap_greeting(text: str, rng: random.Random) -> str:
    return f"{rng.choice(_GREETINGS)} {_LEADING_GREETING.sub('', text)}"


def _add_closing(text: str, rng: random.Random) -> str:
    return f"{text.rstrip()} {rng.choice(_CLOSINGS)}"


def _reorder_sentences(text: str, rng: random.Random) -> str:
    sentences = re.split(r"(?<=[.!?])\s+", _LEADING_GREETING.sub("", text).strip())
    if len(sentences) < 2:
        return text
    rng.shuffle(sentences)
    return " ".join(sentences)


GENERATORS = {"greeting-swap": _swap_greeting, "closing": _add_closing, "reorder": _reorder_sentences}


def augment(clean_file: Path, cfg: AugmentConfig) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(clean_file, encoding="utf-8") as fh:
        real = [json.loads(line) for line in fh]
    # Exact duplicates only: a rewrite is by design close to its parent, so a near-duplicate test
    # would reject nearly all of them.
    seen = Deduplicator(near=False)
    for r in real:
        _, token = seen.check(record_text(r["messages"]), "")
        if token is not None:
            seen.add(token)
    budget = int(len(real) * cfg.max_synthetic_fraction) if cfg.enabled else 0
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
        text, found = redact(GENERATORS[name](user_turn["content"], rng))
        if found:  # a rewrite must never surface PII; placeholders are not re-detected
            rejected["pii"] += 1
            continue
        user_turn["content"] = text
        kind, token = seen.check(record_text(messages), "")
        if kind is not None:
            rejected["duplicate"] += 1
            continue
        seen.add(token)
        synthetic.append({"messages": messages, "provenance": {
            "synthetic": True, "generator": f"rule:{name}", "seed": cfg.seed, "parent": parent.get("source")}})
    with open(out / "train.jsonl", "w", encoding="utf-8") as fh:
        for rec in real + synthetic:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    report = {
        "real": len(real),
        "synthetic": len(synthetic),
        "total": len(real) + len(synthetic),
        "synthetic_fraction": round(len(synthetic) / max(len(real), 1), 4),
        "max_synthetic_fraction": cfg.max_synthetic_fraction,
        "by_generator": dict(sorted(Counter(r["provenance"]["generator"] for r in synthetic).items())),
        "rejected": dict(rejected),
    }
    write_json(out / "report.json", report)
    return report
