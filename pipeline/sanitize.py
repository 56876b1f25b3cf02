"""The sanitize stage: validate, redact PII, deduplicate; nothing dropped without a reason.

    loraflow sanitize data/raw/tickets_train.jsonl --out data/clean/train

Writes ``OUT/clean.jsonl`` (records with their source file and line), ``OUT/quarantine.jsonl`` (source,
line, reason, raw content for a person to fix; never used downstream), ``OUT/report.json`` (counts that
reconcile: read = kept + quarantined + duplicates) and ``OUT/data_card.md``. Records of an eval split can
be checked against the train split's texts (``reference``) so held-out data never leaks into training.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import SanitizeConfig
from pipeline.jsonio import write_json
from pipeline.pii import redact
from pipeline.records import RecordError, parse_line, prompt_text


class NoValidRecords(RuntimeError):
    """The input had no record that survived validation."""


_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def exact_key(messages: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()


def near_key(text: str) -> str:
    """Case-, spacing- and punctuation-insensitive fingerprint of a text."""
    return hashlib.sha256(_NON_ALNUM.sub(" ", text.lower()).strip().encode()).hexdigest()


@dataclass
class SanitizeReport:
    inputs: list[str]
    read: int = 0
    kept: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    redactions: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict:
        return {
            "inputs": self.inputs,
            "read": self.read,
            "kept": self.kept,
            "quarantined": {"total": sum(self.quarantined.values()), "by_reason": dict(sorted(self.quarantined.items()))},
            "duplicates": {"total": sum(self.duplicates.values()),
                           **{k: self.duplicates.get(k, 0) for k in ("exact", "near", "contamination")}},
            "redactions": {"total": sum(self.redactions.values()), "by_type": dict(sorted(self.redactions.items()))},
            "reconciles": self.read == self.kept + sum(self.quarantined.values()) + sum(self.duplicates.values()),
        }


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    # Decode per line so one bad byte sequence quarantines one line, not the file.
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                yield lineno, RecordError("invalid_utf8", f"byte {err.start}: {err.reason}")  # type: ignore[misc]


def reference_keys(clean_file: Path) -> set[str]:
    """Near-duplicate keys of the prompts in a clean file (for eval-vs-train contamination checks)."""
    keys = set()
    with open(clean_file, encoding="utf-8") as fh:
        for line in fh:
            keys.add(near_key(prompt_text(json.loads(line)["messages"])))
    return keys


def sanitize_files(
    inputs: list[Path], out_dir: Path, cfg: SanitizeConfig, reference: set[str] | None = None
) -> dict:
    """Sanitize ``inputs`` into ``out_dir``; returns the report (also written as report.json)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = SanitizeReport(inputs=[str(p) for p in inputs])
    seen_exact: set[str] = set()
    seen_near: set[str] = set()
    reference = reference or set()
    with open(out_dir / "clean.jsonl", "w", encoding="utf-8") as clean, \
         open(out_dir / "quarantine.jsonl", "w", encoding="utf-8") as quarantine:
        for path in inputs:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: input file not found")
            for lineno, line in _lines(path):
                report.read += 1
                try:
                    if isinstance(line, RecordError):
                        raise line
                    messages = parse_line(line, cfg.max_chars)
                except RecordError as err:
                    report.quarantined[err.reason] += 1
                    raw = line if isinstance(line, str) else "<undecodable bytes>"
                    quarantine.write(json.dumps({"source": str(path), "line": lineno, "reason": err.reason,
                                                 "detail": err.detail, "raw": raw.rstrip("\r\n")},
                                                ensure_ascii=False) + "\n")
                    continue
                redacted, counts = [], Counter()
                for m in messages:
                    text, c = redact(m["content"])
                    counts += c
                    redacted.append({"role": m["role"], "content": text})
                ek = exact_key(redacted)
                if ek in seen_exact:
                    report.duplicates["exact"] += 1
                    continue
                nk = near_key(" ".join(m["content"] for m in redacted))
                if cfg.near_duplicates and nk in seen_near:
                    report.duplicates["near"] += 1
                    continue
                if near_key(prompt_text(redacted)) in reference:
                    report.duplicates["contamination"] += 1
                    continue
                seen_exact.add(ek)
                seen_near.add(nk)
                report.redactions += counts
                report.kept += 1
                clean.write(json.dumps({"messages": redacted, "source": {"file": str(path), "line": lineno}},
                                       ensure_ascii=False) + "\n")
    result = report.to_dict()
    write_json(out_dir / "report.json", result)
    (out_dir / "data_card.md").write_text(data_card(result), encoding="utf-8")
    if report.read == 0:
        raise NoValidRecords(f"{', '.join(map(str, inputs))}: input is empty")
    if report.kept == 0:
        reasons = ", ".join(f"{k}={v}" for k, v in report.quarantined.most_common(3))
        raise NoValidRecords(
            f"{', '.join(map(str, inputs))}: no valid record in {report.read} lines ({reasons}); "
            f"see {out_dir / 'quarantine.jsonl'}"
        )
    return result


def data_card(report: dict) -> str:
    q = report["quarantined"]
    rows = "\n".join(f"| {k} | {v} |" for k, v in q["by_reason"].items()) or "| - | 0 |"
    red = ", ".join(f"{k}: {v}" for k, v in report["redactions"]["by_type"].items()) or "none"
    d = report["duplicates"]
    return (
        "# Data card\n\n"
        f"Inputs: {', '.join(report['inputs'])}\n\n"
        f"- records read: {report['read']}\n- kept: {report['kept']}\n"
        f"- quarantined: {q['total']}\n"
        f"- duplicates removed: {d['total']} (exact {d['exact']}, near {d['near']}, "
        f"eval-vs-train contamination {d['contamination']})\n"
        f"- PII redactions: {report['redactions']['total']} ({red})\n\n"
        "## Quarantine reasons\n\n| reason | records |\n|---|---|\n" + rows + "\n"
    )
