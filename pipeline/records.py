"""Parse and validate one raw JSONL line into a chat record, or say precisely why it is unusable.

A record is ``{"messages": [{"role": ..., "content": ...}, ...]}`` with at least one user and one
assistant turn. ``parse_line`` raises ``RecordError`` with a stable, machine-readable reason code
(used for quarantine counts) and a human-readable detail.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass

ROLES = frozenset({"system", "user", "assistant"})


@dataclass
class RecordError(Exception):
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def normalise_text(text: str) -> str:
    """NFKC plus stripping of format characters (zero-width, bidi overrides) that can hide PII."""
    text = unicodedata.normalize("NFKC", text)
    return "".join(ch for ch in text if unicodedata.category(ch) != "Cf")


def parse_line(line: str, max_chars: int) -> list[dict[str, str]]:
    """Return the validated, normalised messages of one JSONL line."""
    stripped = line.strip()
    if not stripped:
        raise RecordError("blank_line", "empty line")
    if len(stripped) > max_chars * 4:
        raise RecordError("too_long", f"line has {len(stripped)} characters")
    try:
        obj = json.loads(stripped)
    except json.JSONDecodeError as err:
        raise RecordError("invalid_json", f"{err.msg} at column {err.colno}") from None
    if not isinstance(obj, dict):
        raise RecordError("not_an_object", f"top level is {type(obj).__name__}, expected an object")
    if "messages" not in obj:
        raise RecordError("missing_messages", f"no 'messages' key (keys: {sorted(obj)[:5]})")
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise RecordError("wrong_type", f"'messages' is {type(messages).__name__}, expected a list")
    if not messages:
        raise RecordError("empty_conversation", "'messages' is empty")
    out: list[dict[str, str]] = []
    total = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RecordError("wrong_type", f"messages[{i}] is {type(m).__name__}, expected an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RecordError("unknown_role", f"messages[{i}].role is {role!r}")
        if not isinstance(content, str):
            raise RecordError("wrong_type", f"messages[{i}].content is {type(content).__name__}")
        content = normalise_text(content).strip()
        if not content:
            raise RecordError("blank_content", f"messages[{i}] ({role}) has no text")
        total += len(content)
        out.append({"role": role, "content": content})
    if total > max_chars:
        raise RecordError("too_long", f"{total} characters of content (limit {max_chars})")
    roles = [m["role"] for m in out]
    if "user" not in roles:
        raise RecordError("no_user_turn", "conversation has no user message")
    if roles[-1] != "assistant":
        raise RecordError("no_assistant_turn", "conversation does not end with an assistant answer")
    return out


def prompt_text(messages: list[dict[str, str]]) -> str:
    """The text the model is asked about: all turns but the final answer."""
    return "\n".join(m["content"] for m in messages[:-1])
