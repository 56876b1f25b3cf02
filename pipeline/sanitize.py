"""The sanitize stage: validate, normalise, redact PII and secrets, deduplicate; nothing lost.

    loraflow sanitize data/raw/tickets_train.jsonl more.csv --out data/clean/train

Writes ``OUT/clean.jsonl`` (chat records with their source file and line), ``OUT/quarantine.jsonl``
(source, line, reason, detail and the raw content so a person can fix it; never used downstream or
logged to MLflow), ``OUT/report.json`` (read = kept + quarantined + duplicates, always) and
``OUT/data_card.md``. Records stream through one at a time; only the dedup index grows, at a few
dozen bytes a record (see pipeline/dedup.py). An eval split is checked against the train split's
prompts (``reference``) so held-out data never leaks into training.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import SanitizeConfig
from pipeline.dedup import Deduplicator
from pipeline.ingest import read_records
from pipeline.jsonio import write_json
from pipeline.pii import build_detectors, redact
from pipeline.records import RecordError, prompt_text, to_messages


class NoValidRecords(RuntimeError):
    """The input was empty or had no record that survived validation."""


def new_index(cfg: SanitizeConfig) -> Deduplicator:
    return Deduplicator(cfg.near_duplicates, cfg.near_threshold, cfg.num_perm, cfg.shingle_words)


def record_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


@dataclass
class SanitizeReport:
    inputs: list[str]
    read: int = 0
    kept: int = 0
    bytes_read: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    redactions: Counter[str] = field(default_factory=Counter)
    repairs: Counter[str] = field(default_factory=Counter)
    per_source: dict[str, Counter[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        q, d = sum(self.quarantined.values()), sum(self.duplicates.values())
        return {
            "inputs": self.inputs,
            "read": self.read,
            "kept": self.kept,
            "quarantined": {"total": q, "by_reason": dict(sorted(self.quarantined.items()))},
            "duplicates": {"total": d, **{k: self.duplicates.get(k, 0) for k in ("exact", "near", "contamination")}},
            "redactions": {"total": sum(self.redactions.values()), "by_type": dict(sorted(self.redactions.items()))},
            "repairs": dict(sorted(self.repairs.items())),
            "per_source": {k: dict(v) for k, v in self.per_source.items()},
            "reconciles": self.read == self.kept + q + d,
        }


def sanitize_files(
    inputs: list[Path],
    out_dir: Path,
    cfg: SanitizeConfig,
    reference: Deduplicator | None = None,
    index: Deduplicator | None = None,
    progress: Callable[[str], None] | None = None,
    progress_every: int = 100_000,
) -> dict:
    """Sanitize ``inputs`` into ``out_dir`` and return the report (also written as report.json).

    ``reference``: another split's index; records whose prompt it knows count as contamination.
    ``index``: the dedup index to fill (pass one to use this split as another's reference).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    report = SanitizeReport(inputs=[str(p) for p in inputs])
    detectors = build_detectors(tuple(cfg.phone_regions), cfg.custom_pii)
    index = index if index is not None else new_index(cfg)
    started = time.perf_counter()
    with open(out_dir / "clean.jsonl", "w", encoding="utf-8") as clean, \
         open(out_dir / "quarantine.jsonl", "w", encoding="utf-8") as quarantine:
        for path in inputs:
            source = report.per_source.setdefault(str(path), Counter())
            for rec in read_records(Path(path), cfg.columns):
                report.read += 1
                source["read"] += 1
                report.bytes_read += len(rec.raw) + 1
                report.repairs.update(rec.repairs)
                if progress and report.read % progress_every == 0:
                    mb = report.bytes_read / 1e6
                    progress(f"sanitize: {report.read:,} records, {mb:,.0f} MB, "
                             f"{mb / (time.perf_counter() - started):.1f} MB/s, kept {report.kept:,}")
                try:
                    if rec.error is not None:
                        raise rec.error
                    messages = to_messages(rec.value, cfg.max_chars, cfg.max_depth)
                except RecordError as err:
                    report.quarantined[err.reason] += 1
                    source["quarantined"] += 1
                    quarantine.write(json.dumps({"source": rec.source, "line": rec.line, "reason": err.reason,
                                                 "detail": err.detail, "raw": rec.raw}) + "\n")
                    continue
                counts: Counter[str] = Counter()
                for m in messages:
                    m["content"], c = redact(m["content"], detectors)
                    counts += c
                prompt = prompt_text(messages)
                kind, token = index.check(record_text(messages), prompt)
                if kind is None and reference is not None and reference.knows_prompt(prompt):
                    kind = "contamination"
                if kind is not None:
                    report.duplicates[kind] += 1
                    source["duplicates"] += 1
                    continue
                index.add(token)
                report.redactions += counts
                report.kept += 1
                source["kept"] += 1
                clean.write(json.dumps({"messages": messages, "source": {"file": rec.source, "line": rec.line}},
                                       ensure_ascii=False) + "\n")
    result = report.to_dict()
    result["seconds"] = round(time.perf_counter() - started, 3)
    write_json(out_dir / "report.json", result)
    (out_dir / "data_card.md").write_text(data_card(result), encoding="utf-8")
    names = ", ".join(map(str, inputs))
    if report.read == 0:
        raise NoValidRecords(f"{names}: input is empty")
    if report.kept == 0:
        reasons = ", ".join(f"{k}={v}" for k, v in report.quarantined.most_common(3)) or "all duplicates"
        raise NoValidRecords(f"{names}: no valid record in {report.read} lines ({reasons}); "
                             f"see {out_dir / 'quarantine.jsonl'}")
    return result


def index_from_file(clean_file: Path, cfg: SanitizeConfig) -> Deduplicator:
    """The dedup index of an already sanitized split (``loraflow sanitize --reference``)."""
    index = new_index(cfg)
    with open(clean_file, encoding="utf-8") as fh:
        for line in fh:
            messages = json.loads(line)["messages"]
            _, token = index.check(record_text(messages), prompt_text(messages))
            if token is not None:
                index.add(token)
    return index


def data_card(report: dict) -> str:
    q = report["quarantined"]
    rows = "\n".join(f"| {k} | {v} |" for k, v in q["by_reason"].items()) or "| - | 0 |"
    red = ", ".join(f"{k}: {v}" for k, v in report["redactions"]["by_type"].items()) or "none"
    rep = ", ".join(f"{k}: {v}" for k, v in report["repairs"].items()) or "none"
    d = report["duplicates"]
    return (
        "# Data card\n\n"
        f"Inputs: {', '.join(report['inputs'])}\n\n"
        f"- records read: {report['read']}\n- kept: {report['kept']}\n"
        f"- quarantined: {q['total']}\n"
        f"- duplicates removed: {d['total']} (exact {d['exact']}, near {d['near']}, "
        f"eval-vs-train contamination {d['contamination']})\n"
        f"- PII and secrets redacted: {report['redactions']['total']} ({red})\n"
        f"- repaired in place: {rep}\n\n"
        "## Quarantine reasons\n\n| reason | records |\n|---|---|\n" + rows + "\n"
    )
