"""Small file helpers shared by the stages: JSON reports and the sanitized chat JSONL records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def rotated_files(path: Path) -> list[Path]:
    """Rotated predecessors of a log ``path``: ``<stem>.<UTC time><suffix>``, oldest first (the serving
    gateway writes them, drift monitoring reads them)."""
    return sorted(path.parent.glob(f"{path.stem}.*{path.suffix}"))


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
