"""Small file helpers shared by the stages: JSON reports and the sanitized chat JSONL records."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def rotated_files(path: Path) -> list[Path]:
    """Rotated predecessors of a log ``path``: ``<stem>.<UTC time><suffix>``, oldest first (the serving
    gateway writes them, drift monitoring reads them)."""
    return sorted(path.parent.glob(f"{path.stem}.*{path.suffix}"))


def log_files(path: Path) -> list[Path]:
    """A rotated log's files, oldest first: the rotated ones, then the live ``path`` when it exists."""
    rotated = rotated_files(path)
    return [*rotated, path] if path.is_file() else rotated


def count_lines(path: Path) -> int:
    """Records in a JSONL file (0 when it does not exist)."""
    if not Path(path).is_file():
        return 0
    with open(path, "rb") as fh:
        return sum(1 for _ in fh)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_json(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")


def load_chat_file(path: Path) -> list[dict]:
    """Prompt-completion rows from a sanitized chat JSONL (the last assistant turn is the completion)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            msgs = json.loads(line)["messages"]
            rows.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
    return rows


def first_prompts(path: Path, n: int = 3, max_chars: int = 1500) -> list[list[dict]]:
    """The first ``n`` prompts of a sanitized chat file, each message cut to ``max_chars`` (they travel in
    MLflow tags, which are bounded): the held-out prompts a served version's smoke test asks."""
    path = Path(path)
    rows = load_chat_file(path)[:n] if path.is_file() and path.stat().st_size else []
    return [[{**m, "content": m["content"][:max_chars]} for m in r["prompt"]] for r in rows]


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` of a log for an error message; says so when the log cannot be read."""
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"<log unreadable: {err.strerror or err}>"


class LogError(ValueError):
    """A log line that is not a record (names the file and line)."""


@dataclass
class LogStats:
    """What a pass over a log skipped: torn last lines (a writer stopped mid-line), counted, never silent."""

    torn: list[str] = field(default_factory=list)  # "file:line" of each torn last line skipped


def read_log(path: Path, stats: LogStats | None = None, files: list[Path] | None = None,
             contains: bytes | None = None) -> Iterator[tuple[Path, int, dict]]:
    """Every record of a rotated JSONL log (``log_files``), oldest file first, streamed as (file, line, record).

    The one policy every reader of the gateway's logs follows: a file's last line that has no newline is a
    write cut short (the writer was killed, or is writing it now; its next start rotates a torn file away),
    so it is skipped and counted in ``stats``; any other line that is not a JSON object is damage, a
    ``LogError`` naming the file and line (never skipped: a reader that skips damage reports less than was
    served). Each file is read up to its size when opened, so a line being appended meanwhile is torn, not
    damage. A file rotated away or expired between listing and reading is gone, not damage. ``files``: only
    these of the log's files; ``contains``: only lines holding these bytes are read (a lookup by id: damage
    elsewhere does not change its answer).
    """
    for f in log_files(path) if files is None else files:
        try:
            fh = open(f, "rb")
        except FileNotFoundError:
            continue
        with fh:
            left = os.fstat(fh.fileno()).st_size
            for n, raw in enumerate(fh, 1):
                if left <= 0:
                    break
                raw, left = raw[:left], left - len(raw)
                if not raw.endswith(b"\n"):  # the last line, cut short (or still being written)
                    if stats is not None and raw.strip():
                        stats.torn.append(f"{f}:{n}")
                    break
                if not raw.strip() or (contains is not None and contains not in raw):
                    continue
                try:
                    rec = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise LogError(f"{f}:{n}: not a JSON record ({e})") from None
                if not isinstance(rec, dict):
                    raise LogError(f"{f}:{n}: not a JSON object")
                yield f, n, rec


def ends_torn(path: Path) -> bool:
    """Whether ``path`` ends in a line cut short (no final newline): a writer appending to it must rotate it
    first, so the torn line stays the last line of its file (what ``read_log`` skips)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            if fh.tell() == 0:
                return False
            fh.seek(-1, 2)
            return fh.read(1) != b"\n"
    except FileNotFoundError:
        return False
