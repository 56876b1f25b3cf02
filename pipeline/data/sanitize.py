"""The sanitize stage: validate, normalise, redact PII and secrets, deduplicate; nothing lost.

    loraflow sanitize data/raw/tickets_train.jsonl more.csv --out data/clean/train

Writes ``OUT/clean.jsonl`` (chat records with their source file and line), ``OUT/validation.jsonl`` (the
validation share, carved deterministically by prompt hash; empty when none is asked for), ``OUT/quarantine.jsonl`` (source,
line, reason, detail and the record's text, itself redacted, so a person can fix it; never used downstream
or logged to MLflow), ``OUT/report.json`` (read = kept + quarantined + duplicates, always) and
``OUT/data_card.md``. Records stream through one at a time; the dedup index grows by a few dozen bytes a
record and the prompts it verifies against go to a temporary file (see pipeline/dedup.py).

Quarantine reasons include the record defects of pipeline/data/records.py, ``invalid_answer`` (the answer
does not fit the task: invalid JSON, a schema violation, a label outside the set, SQL that does not parse)
and ``label_conflict`` (the same prompt with different answers: every such record, each naming the first).
An eval split is checked against the train split (``reference``) so held-out data never leaks into training.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pipeline.config import SanitizeConfig
from pipeline.dedup import Deduplicator, Keys, LshKeys, digest64, record_text, text_key
from pipeline.pii import Redactor, build_redactor, digest_key, normalise_text, value_digest, write_digests
from pipeline.data.records import RecordError, prompt_text, to_messages, to_preference
from pipeline.io import write_json
from pipeline.layout import PII_DIGESTS
from pipeline.tasks import Task

if TYPE_CHECKING:
    from pipeline.data.engine import Engine

Shape = Literal["chat", "preference"]


class NoValidRecords(RuntimeError):
    """The input was empty or had no record that survived validation."""


def new_index(cfg: SanitizeConfig, shape: Shape = "chat") -> Deduplicator:
    # Preference data: one prompt with several chosen/rejected pairs is normal, and pairs differ by design.
    chat = shape == "chat"
    return Deduplicator(cfg.near_duplicates and chat, cfg.near_threshold, cfg.num_perm, cfg.shingle_words,
                        conflicts=chat)


@dataclass
class SanitizeReport:
    inputs: list[str]
    read: int = 0
    kept: int = 0
    validation: int = 0  # of ``kept``, how many went to validation.jsonl
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
            "clean": self.kept - self.validation,  # in clean.jsonl; the rest of ``kept`` in validation.jsonl
            "validation": self.validation,
            "quarantined": {"total": q, "by_reason": dict(sorted(self.quarantined.items()))},
            "duplicates": {"total": d, **{k: self.duplicates.get(k, 0) for k in ("exact", "near", "contamination")}},
            "redactions": {"total": sum(self.redactions.values()), "by_type": dict(sorted(self.redactions.items()))},
            "repairs": dict(sorted(self.repairs.items())),
            "per_source": {k: dict(v) for k, v in self.per_source.items()},
            "reconciles": self.read == self.kept + q + d,
        }


def dedup_keys(messages: list[dict[str, str]], answers: int, task: Task | None) -> tuple[str, str, str]:
    """What a record is deduplicated on: the whole record, its prompt and its answer, each in the
    normalised view (so invisible or compatibility characters do not make a different record) and the
    answer by meaning (the task's parser: the same JSON with other whitespace is the same answer)."""
    norm = [{"role": m["role"], "content": normalise_text(m["content"]).strip()} for m in messages]
    prompt = prompt_text(norm, answers)
    answer = norm[-answers]["content"]
    canonical = task.answer_key(answer) if task is not None else text_key(answer)
    rest = [m["content"] for m in norm[len(norm) - answers + 1:]]  # a preference record's rejected answer
    return record_text(norm[:-answers]) + "\n\x1f" + "\n\x1f".join([canonical, *rest]), prompt, canonical


def _in_validation(prompt_key: int, fraction: float) -> bool:
    return fraction > 0 and (prompt_key & 0xFFFF) < fraction * 0x10000


@dataclass(slots=True)
class Prepared:
    """One input record after everything that needs only the record itself: parsed, validated, redacted,
    checked against the task and keyed for dedup. What is left (duplicates, conflicts, contamination,
    the validation carve) is decided over all records in input order, so any engine gives the same output.
    It carries no unredacted text except ``raw`` in the local engine (it stays in memory)."""

    source: str
    line: int
    nbytes: int
    repairs: list[str]
    reject: tuple[str, str] | None = None  # (reason, detail)
    quarantine_raw: str = ""  # redacted, for a rejected record
    keys: Keys | None = None
    prompt: str = ""
    answer_key: str = ""
    redactions: dict[str, int] | None = None
    found: list[str] | None = None  # keyed digests of the values redacted
    out: str = ""  # the clean line
    raw: str | None = None  # local engine only: redacted on demand for a label-conflict entry
    shard: int = -1  # Dask engine: which shard it came from (its worker re-reads a conflict's raw line)


class Preparer:
    """Turns raw records into ``Prepared`` ones; built once per process (the local run or a Dask worker)."""

    def __init__(self, cfg: SanitizeConfig, task: Task | None, shape: Shape, key: bytes, near: bool,
                 redactor: Redactor | None = None, keep_raw: bool = True) -> None:
        self.cfg, self.task, self.shape, self.key, self.keep_raw = cfg, task, shape, key, keep_raw
        self.redactor = redactor or build_redactor(cfg)
        self.answers = 2 if shape == "preference" else 1
        self.convert = to_preference if shape == "preference" else to_messages
        self.lsh = LshKeys(cfg.num_perm, cfg.shingle_words, cfg.near_threshold) if near else None

    def __call__(self, rec) -> Prepared:
        item = Prepared(rec.source, rec.line, len(rec.raw) + 1, rec.repairs)
        try:
            if rec.error is not None:
                raise rec.error
            messages = self.convert(rec.value, self.cfg.max_chars, self.cfg.max_depth)
        except RecordError as err:
            return self._reject(item, rec, err.reason, err.detail)
        counts: Counter[str] = Counter()
        found: list[str] = []
        for m in messages:
            m["content"], c = self.redactor.redact(m["content"], found)
            counts += c
        answers = self.answers
        why = self.task.check_reference(messages[-answers]["content"]) if self.task is not None else None
        if why:
            return self._reject(item, rec, "invalid_answer", why)
        record_key, prompt, answer_key = dedup_keys(messages, answers, self.task)
        item.keys = Keys.of(record_key, prompt, answer_key, self.lsh)
        item.prompt, item.answer_key = prompt, answer_key
        item.redactions, item.found = dict(counts), sorted({value_digest(v, self.key) for v in found})
        if self.shape == "preference":
            out = {"prompt": messages[:-2], "chosen": messages[-2]["content"], "rejected": messages[-1]["content"]}
        else:
            out = {"messages": messages}
        out["source"] = {"file": rec.source, "line": rec.line}
        if isinstance(rec.value, dict) and isinstance(rec.value.get("provenance"), dict):
            out["provenance"] = rec.value["provenance"]  # curated and synthetic records keep theirs
        item.out = json.dumps(out, ensure_ascii=False) + "\n"
        item.raw = rec.raw if self.keep_raw else None
        return item

    def _reject(self, item: Prepared, rec, reason: str, detail: str) -> Prepared:
        item.reject = (reason, detail)
        item.quarantine_raw = self.redacted_raw(rec.raw)
        return item

    def redacted_raw(self, raw: str) -> str:
        """A record's line as the quarantine file stores it (a person fixes it from there)."""
        return self.redactor.redact(raw)[0]


def sanitize_files(
    inputs: list[Path],
    out_dir: Path,
    cfg: SanitizeConfig,
    task: Task | None = None,
    reference: Deduplicator | None = None,
    index: Deduplicator | None = None,
    validation_fraction: float = 0.0,
    shape: Shape = "chat",
    progress: Callable[[str], None] | None = None,
    progress_every: int = 100_000,
    redactor: Redactor | None = None,
    require_records: bool = True,
    engine: "Engine | None" = None,
) -> dict:
    """Sanitize ``inputs`` into ``out_dir`` and return the report (also written as report.json).

    ``task``: answers that do not fit it are quarantined as ``invalid_answer`` (None: any answer).
    ``reference``: another split's index; records it knows (verified) count as contamination.
    ``index``: the dedup index to fill (pass one to use this split as another's reference).
    ``shape``: "preference" reads prompt/chosen/rejected records (exact dedup only; a prompt with several
    preference pairs is normal) and checks the chosen answer against the task.
    ``redactor``: built from ``cfg`` when not given (pass one to share a loaded recogniser model).
    ``require_records``: an input with no record left is an error (False: curated data, where every record
    may legitimately be a duplicate).
    ``engine``: where the per-record work runs (pipeline/data/engine.py; None: in this process). Every
    decision that needs other records is taken here, in input order, so the outputs do not depend on it.
    Stored text is the user's, character for character, except for redacted spans.
    """
    from pipeline.data.engine import LocalEngine

    out_dir.mkdir(parents=True, exist_ok=True)
    report = SanitizeReport(inputs=[str(p) for p in inputs])
    index = index if index is not None else new_index(cfg, shape)
    key = digest_key()
    near = index.near or (reference is not None and reference.near)
    # Band keys computed by the engine serve the reference only when it bands the same way (it was built
    # from another config: it computes its own).
    ref_bands = reference is not None and reference.near and reference.lsh.settings == LshKeys(
        cfg.num_perm, cfg.shingle_words, cfg.near_threshold).settings
    engine = engine or LocalEngine(redactor)
    conflicts: dict[int, list[dict]] = {}  # prompt digest -> quarantine entries waiting for the first's line
    pending: list[tuple[dict, Prepared]] = []  # conflict entries whose redacted text the engine fetches
    redacted: set[str] = set()  # keyed digests of the PII values removed from kept records (leak probe)
    started = time.perf_counter()
    validation_path = out_dir / "validation.jsonl"
    with open(out_dir / "clean.jsonl", "w", encoding="utf-8") as clean, \
         open(validation_path, "w", encoding="utf-8") as validation, \
         open(out_dir / "quarantine.jsonl", "w", encoding="utf-8") as quarantine:
        for item in engine.prepare(inputs, cfg, task, shape, key, near, progress):
            source = report.per_source.setdefault(item.source, Counter())
            report.read += 1
            source["read"] += 1
            report.bytes_read += item.nbytes
            report.repairs.update(item.repairs)
            if progress and report.read % progress_every == 0:
                mb = report.bytes_read / 1e6
                progress(f"sanitize: {report.read:,} records, {mb:,.0f} MB, "
                         f"{mb / (time.perf_counter() - started):.1f} MB/s, kept {report.kept:,}")
            if item.reject is not None:
                reason, detail = item.reject
                report.quarantined[reason] += 1
                source["quarantined"] += 1
                quarantine.write(json.dumps({"source": item.source, "line": item.line, "reason": reason,
                                             "detail": detail, "raw": item.quarantine_raw},
                                            ensure_ascii=False) + "\n")
                continue
            verdict = index.check_keys(item.prompt, item.keys)
            if verdict.kind == "label_conflict":
                report.quarantined["label_conflict"] += 1
                source["quarantined"] += 1
                entry = {"source": item.source, "line": item.line, "reason": "label_conflict", "raw": None}
                conflicts.setdefault(item.keys.prompt, []).append(entry)
                pending.append((entry, item))
                continue
            kind = verdict.kind
            if kind is None and reference is not None and reference.contains(
                    item.prompt, item.answer_key, item.keys.bands if ref_bands else None):
                kind = "contamination"
            if kind is not None:
                report.duplicates[kind] += 1
                source["duplicates"] += 1
                continue
            token = verdict.token
            index.add(token)
            report.redactions.update(item.redactions)
            redacted.update(item.found)
            report.kept += 1
            source["kept"] += 1
            if _in_validation(token[1], validation_fraction):
                report.validation += 1
                validation.write(item.out)
            else:
                clean.write(item.out)
    if pending:
        for (entry, _), text in zip(pending, engine.redacted_raws([item for _, item in pending], cfg)):
            entry["raw"] = text
    if conflicts:  # after the clean files are closed: the first records of each conflict are in them
        with open(out_dir / "quarantine.jsonl", "a", encoding="utf-8") as quarantine:
            _resolve_conflicts(out_dir, conflicts, report, quarantine)
    write_digests(out_dir / PII_DIGESTS, redacted, key)
    result = report.to_dict()
    result["engine"] = engine.describe()
    result["seconds"] = round(time.perf_counter() - started, 3)
    write_json(out_dir / "report.json", result)
    (out_dir / "data_card.md").write_text(data_card(result), encoding="utf-8")
    names = ", ".join(map(str, inputs))
    if not require_records:
        return result
    if report.read == 0:
        raise NoValidRecords(f"{names}: input is empty")
    if report.kept == 0:
        reasons = ", ".join(f"{k}={v}" for k, v in report.quarantined.most_common(3)) or "all duplicates"
        raise NoValidRecords(f"{names}: no valid record in {report.read} lines ({reasons}); "
                             f"see {out_dir / 'quarantine.jsonl'}")
    return result


def _resolve_conflicts(out_dir: Path, conflicts: dict[int, list[dict]], report: SanitizeReport, quarantine) -> None:
    """Move the first record of each contested prompt out of the clean files; every record of the conflict
    is quarantined naming the first one's line, so a person sees all the answers side by side. A conflict
    whose first record is in another split (the index is shared: curated records against train) stays
    there, and the later records are quarantined saying so."""
    matched: set[int] = set()
    for name in ("clean.jsonl", "validation.jsonl"):
        path = out_dir / name
        if not path.stat().st_size:
            continue
        tmp = path.with_suffix(".tmp")
        with open(path, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
            for line in src:
                rec = json.loads(line)
                pkey = digest64(dedup_keys(rec["messages"], 1, None)[1])
                if pkey not in conflicts:
                    dst.write(line)
                    continue
                matched.add(pkey)
                first = f"{rec['source']['file']}:{rec['source']['line']}"
                for entry in conflicts[pkey]:
                    quarantine.write(json.dumps({**entry, "detail": f"same prompt as {first} with a different "
                                                 "answer"}, ensure_ascii=False) + "\n")
                quarantine.write(json.dumps({"source": rec["source"]["file"], "line": rec["source"]["line"],
                                             "reason": "label_conflict",
                                             "detail": f"{len(conflicts[pkey])} later record(s) have the same "
                                                       "prompt with a different answer",
                                             "raw": json.dumps(rec, ensure_ascii=False)}, ensure_ascii=False) + "\n")
                report.kept -= 1
                report.validation -= name == "validation.jsonl"
                report.quarantined["label_conflict"] += 1
                src_counts = report.per_source.get(rec["source"]["file"])
                if src_counts is not None:
                    src_counts["kept"] -= 1
                    src_counts["quarantined"] += 1
        os.replace(tmp, path)
    for pkey, entries in conflicts.items():
        if pkey not in matched:
            for entry in entries:
                quarantine.write(json.dumps({**entry, "detail": "same prompt as a record of another input split "
                                             "(kept there) with a different answer"}, ensure_ascii=False) + "\n")


def index_from_file(clean_file: Path, cfg: SanitizeConfig, task: Task | None = None) -> Deduplicator:
    """The dedup index of an already sanitized split (``loraflow sanitize --reference``); ``task`` must be
    the one the other split is sanitized with, so answers compare by the same meaning."""
    index = new_index(cfg)
    with open(clean_file, encoding="utf-8") as fh:
        for line in fh:
            token = index.check(*dedup_keys(json.loads(line)["messages"], 1, task)).token
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
        f"- records read: {report['read']}\n- kept: {report['kept']} (clean.jsonl {report['clean']}, "
        f"validation.jsonl {report['validation']})\n"
        f"- quarantined: {q['total']}\n"
        f"- duplicates removed: {d['total']} (exact {d['exact']}, near {d['near']}, "
        f"eval-vs-train contamination {d['contamination']})\n"
        f"- PII and secrets redacted: {report['redactions']['total']} ({red})\n"
        f"- repaired in place: {rep}\n\n"
        "## Quarantine reasons\n\n| reason | records |\n|---|---|\n" + rows + "\n"
    )
