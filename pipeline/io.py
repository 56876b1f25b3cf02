"""Small file helpers shared by the stages: JSON reports and the sanitized chat JSONL records."""

from __future__ import annotations

import json
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
