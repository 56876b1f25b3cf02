"""Stream records out of the files users actually have, one at a time, with their source position.

Formats (chosen by suffix, or a directory saved with ``datasets.Dataset.save_to_disk``):
  .jsonl/.json  one JSON object a line; invalid UTF-8, a BOM and CRLF endings are handled per line
  .json         a JSON array of records (Alpaca's data.json): read element by element; each record's
                "line" is its index in the array (0-based, as in ``data[i]``)
  .csv/.tsv     one record a row; ``sanitize.columns`` maps columns to record fields
  .parquet      read in row batches (pyarrow), same column mapping
  <dir>/        a Hugging Face ``datasets`` folder (memory-mapped Arrow), same column mapping

Nothing is held beyond one batch, so memory does not grow with file size. Each ``RawRecord`` carries
the file and the 1-based line (JSONL) or data row (tabular) number, the parsed value or the reason it
could not be read, and the raw text for the quarantine file.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ColumnMap
from pipeline.data.records import RecordError

TABULAR = {".csv", ".tsv", ".parquet"}
JSONL = {".jsonl", ".json", ".ndjson"}


@dataclass
class RawRecord:
    source: str
    line: int
    value: Any = None
    raw: str = ""
    error: RecordError | None = None
    repairs: list[str] = field(default_factory=list)


class UnsupportedInput(ValueError):
    pass


def _json_error(err: json.JSONDecodeError, text: str) -> RecordError:
    at_end = err.pos >= len(text.rstrip()) - 1 or err.msg.startswith("Unterminated string")
    if at_end and text.lstrip().startswith(("{", "[")):
        return RecordError("truncated_json", f"input ends before the JSON value does ({err.msg})")
    return RecordError("invalid_json", f"{err.msg} at column {err.colno}")


def read_jsonl(path: Path, start: int = 0, end: int | None = None, first_line: int = 1) -> Iterator[RawRecord]:
    """Lines of ``path``; ``start``/``end``: a byte range that begins at a line start (a shard), whose
    first line is number ``first_line``."""
    with open(path, "rb") as fh:
        fh.seek(start)
        pos = start
        for lineno, raw in enumerate(fh, start=first_line):
            if end is not None and pos >= end:
                break
            pos += len(raw)
            rec = RawRecord(str(path), lineno)
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
                rec.repairs.append("bom")
            if raw.endswith(b"\r\n"):
                raw = raw[:-2] + b"\n"
                rec.repairs.append("crlf")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                rec.raw = raw.decode("utf-8", errors="replace").rstrip("\n")
                rec.error = RecordError("invalid_utf8", f"invalid byte 0x{raw[err.start]:02x} at byte {err.start}")
                yield rec
                continue
            rec.raw = text.rstrip("\n")
            if not rec.raw.strip():
                rec.error = RecordError("blank_line", "empty line")
            else:
                try:
                    rec.value = json.loads(rec.raw)
                except json.JSONDecodeError as err:
                    rec.error = _json_error(err, rec.raw)
                except RecursionError:
                    rec.error = RecordError("too_deep", "nesting too deep to parse")
            yield rec


def _starts_with_array(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


_WS = " \t\r\n"


def read_json_array(path: Path, chunk: int = 1 << 16) -> Iterator[RawRecord]:
    """Elements of a top-level JSON array, one at a time (the buffer holds one element and one chunk).

    An element that is not valid JSON ends the read: where the next element starts cannot be known, so the
    rest of the file becomes one quarantined record naming the element and the reason.
    """
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        buf, pos, eof, index = "", 0, False, 0

        def fill() -> bool:
            nonlocal buf, pos, eof
            more = fh.read(chunk)
            eof = not more
            buf, pos = buf[pos:] + more, 0
            return bool(more)

        def skip() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in _WS:
                    pos += 1
                if pos < len(buf) or not fill():
                    return

        skip()
        pos += 1  # the opening bracket (checked by the caller)
        while True:
            skip()
            if pos >= len(buf):
                yield RawRecord(str(path), index, raw="", error=RecordError(
                    "truncated_json", f"the array ends before its closing bracket (after element {index - 1})"))
                return
            if buf[pos] == "]":
                return
            if index:
                if buf[pos] != ",":
                    rest = buf[pos:pos + 200]
                    yield RawRecord(str(path), index, raw=rest, error=RecordError(
                        "invalid_json", f"expected ',' or ']' after element {index - 1}; the rest of the file is "
                                        "not read"))
                    return
                pos += 1
                skip()
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as err:
                    if not eof and fill():
                        continue
                    rest = buf[pos:]
                    yield RawRecord(str(path), index, raw=rest[:2000], error=RecordError(
                        "truncated_json" if err.pos >= len(buf) - 1 else "invalid_json",
                        f"element {index}: {err.msg}; the rest of the file ({len(rest)} characters) is not read"))
                    return
                except RecursionError:
                    yield RawRecord(str(path), index, raw=buf[pos:pos + 200],
                                    error=RecordError("too_deep", f"element {index}: nesting too deep to parse"))
                    return
            raw = buf[pos:end]
            rec = RawRecord(str(path), index, value=value, raw=raw)
            try:
                raw.encode("utf-8")
            except UnicodeEncodeError:
                rec.value, rec.raw = None, raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                rec.error = RecordError("invalid_utf8", f"element {index} contains bytes that are not UTF-8")
            yield rec
            index += 1
            pos = end


def _map_row(row: dict[str, Any], cols: ColumnMap) -> dict[str, Any]:
    """A tabular row as a record dict: mapped columns first, else the row's own field names."""
    mapping = {k: v for k, v in cols.model_dump().items() if v}
    if not mapping:
        return row
    out: dict[str, Any] = {}
    for field_name, column in mapping.items():
        if column not in row:
            raise RecordError("missing_column", f"column {column!r} (sanitize.columns.{field_name}) not in "
                                                f"{sorted(row)[:8]}")
        value = row[column]
        if field_name in ("messages", "conversations") and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise RecordError("invalid_json", f"column {column!r}: {err.msg}") from None
        out[field_name] = value
    return out


def _rows(path: Path, rows: Iterator[dict[str, Any]], cols: ColumnMap) -> Iterator[RawRecord]:
    for n, row in enumerate(rows, start=1):
        rec = RawRecord(str(path), n, raw=json.dumps(row, ensure_ascii=True, default=str))
        try:
            rec.value = _map_row(row, cols)
        except RecordError as err:
            rec.error = err
        yield rec


def _utf8_ok(row: dict[str, Any]) -> bool:
    try:
        for v in row.values():
            if isinstance(v, str):
                v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_csv(path: Path, cols: ColumnMap) -> Iterator[RawRecord]:
    # surrogateescape keeps undecodable bytes visible per row, so one bad row is quarantined, not the file.
    with open(path, encoding="utf-8-sig", newline="", errors="surrogateescape") as fh:
        reader = csv.DictReader(fh, delimiter="\t" if path.suffix == ".tsv" else ",")
        for rec in _rows(path, iter(reader), cols):
            if rec.error is None and not _utf8_ok(rec.value if isinstance(rec.value, dict) else {}):
                rec.error = RecordError("invalid_utf8", "row contains bytes that are not UTF-8")
                rec.raw = rec.raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            yield rec


def read_parquet(path: Path, cols: ColumnMap, batch_size: int = 2048) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    def batches():
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
            yield from batch.to_pylist()

    yield from _rows(path, batches(), cols)


def read_hf_dataset(path: Path, cols: ColumnMap, batch_size: int = 2048) -> Iterator[RawRecord]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    splits = ds.items() if isinstance(ds, DatasetDict) else [(None, ds)]
    for split, part in splits:
        label = Path(f"{path}[{split}]") if split else path

        def rows(part=part):
            for batch in part.iter(batch_size=batch_size):
                keys = list(batch)
                for i in range(len(batch[keys[0]]) if keys else 0):
                    yield {k: batch[k][i] for k in keys}

        yield from _rows(label, rows(), cols)


def read_records(path: Path, cols: ColumnMap) -> Iterator[RawRecord]:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return read_hf_dataset(path, cols)
        raise UnsupportedInput(f"{path}: a directory, but not one saved by datasets.save_to_disk")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: input file not found")
    suffix = path.suffix.lower()
    if suffix == ".json" and _starts_with_array(path):
        return read_json_array(path)
    if suffix in JSONL:
        return read_jsonl(path)
    if suffix in (".csv", ".tsv"):
        return read_csv(path, cols)
    if suffix == ".parquet":
        return read_parquet(path, cols)
    raise UnsupportedInput(f"{path}: unsupported format {suffix!r} (use .jsonl, .csv, .tsv, .parquet "
                           "or a datasets folder)")


@dataclass(frozen=True)
class Shard:
    """A piece of one input that can be read on its own: a byte range of a JSONL file starting at a line
    start (with that line's number), or a whole file of another format."""

    path: str
    start: int = 0
    end: int | None = None
    first_line: int = 1


def _is_jsonl(path: Path) -> bool:
    suffix = path.suffix.lower()
    return path.is_file() and suffix in JSONL and not (suffix == ".json" and _starts_with_array(path))


def plan_shards(paths: list[Path], shard_bytes: int, block: int = 1 << 23) -> list[Shard]:
    """Cut JSONL inputs at line starts every ``shard_bytes`` (one sequential pass that only counts
    newlines, so each shard knows its first line number); other formats are one shard a file."""
    shards: list[Shard] = []
    for path in paths:
        if not _is_jsonl(Path(path)):
            read_records(Path(path), ColumnMap())  # the same clear error for a missing or unsupported input
            shards.append(Shard(str(path)))
            continue
        start, first = 0, 1  # the open shard: its first byte and line number
        pos, line = 0, 1  # the byte and line number at the start of ``chunk``
        with open(path, "rb") as fh:
            while chunk := fh.read(block):
                offset = 0  # bytes of ``chunk`` already counted into ``line``
                while pos + len(chunk) > start + shard_bytes:
                    nl = chunk.find(b"\n", max(offset, start + shard_bytes - pos))
                    if nl < 0:
                        break
                    line += chunk.count(b"\n", offset, nl + 1)
                    offset = nl + 1
                    shards.append(Shard(str(path), start, pos + offset, first))
                    start, first = pos + offset, line
                line += chunk.count(b"\n", offset)
                pos += len(chunk)
        if start < pos or start == 0:
            shards.append(Shard(str(path), start, None, first))
    return shards


def read_shard(shard: Shard, cols: ColumnMap) -> Iterator[RawRecord]:
    if shard.start or shard.end is not None:
        return read_jsonl(Path(shard.path), shard.start, shard.end, shard.first_line)
    return read_records(Path(shard.path), cols)
