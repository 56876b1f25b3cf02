"""Turn one raw record, in any supported shape, into validated chat messages, or say why it cannot be.

Accepted shapes (per record, so one file may mix them):
  chat        {"messages": [{"role": "user"|"assistant"|"system", "content": "..."}, ...]}
  sharegpt    {"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}
  completion  {"prompt": "...", "completion": "..."}   (strings, or chat-message lists)
  alpaca      {"instruction": "...", "input": "...", "output": "..."}   (optional "system")

``to_messages`` raises ``RecordError`` with a stable reason code (quarantine counts are keyed on it) and
a detail a person can act on. Text is kept exactly as written (a zero-width non-joiner is spelling in
Persian, a superscript is mathematics); checks that must not be fooled by invisible characters (blank
turns here, PII and deduplication in sanitize) read the normalised view of pipeline/pii instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pipeline.pii import normalise_text

ROLES = frozenset({"system", "user", "assistant"})
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "bot": "assistant", "model": "assistant"}
# C0 and C1 controls other than tab, newline and carriage return: binary garbage, never text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


@dataclass
class RecordError(Exception):
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def depth(obj: Any, limit: int, level: int = 1) -> int:
    """Nesting depth of a parsed JSON value, stopping once ``limit`` is exceeded."""
    if level > limit:
        return level
    if isinstance(obj, dict):
        return max((depth(v, limit, level + 1) for v in obj.values()), default=level)
    if isinstance(obj, list):
        return max((depth(v, limit, level + 1) for v in obj), default=level)
    return level


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RecordError("wrong_type", f"{where} is {type(value).__name__}, expected a string")
    return value


def _chat_list(value: Any, where: str, role_key: str = "role", content_key: str = "content",
               role_map: dict[str, str] | None = None) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise RecordError("wrong_type", f"'{where}' is {type(value).__name__}, expected a list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RecordError("wrong_type", f"{where}[{i}] is {type(m).__name__}, expected an object")
        raw_role = m.get(role_key)
        role = role_map.get(raw_role) if role_map and isinstance(raw_role, str) else raw_role
        if role not in ROLES:
            raise RecordError("unknown_role", f"{where}[{i}].{role_key} is {raw_role!r}")
        out.append({"role": role, "content": _text(m.get(content_key), f"{where}[{i}].{content_key}")})
    return out


def _turns(value: Any, role: str, where: str) -> list[dict[str, str]]:
    """A prompt/completion side: a plain string or a list of chat messages."""
    if isinstance(value, list):
        return _chat_list(value, where)
    return [{"role": role, "content": _text(value, where)}]


def canonical(obj: Any) -> list[dict[str, str]]:
    """Messages of a record in any accepted shape (not yet validated)."""
    if not isinstance(obj, dict):
        raise RecordError("not_an_object", f"top level is {type(obj).__name__}, expected an object")
    if "messages" in obj:
        return _chat_list(obj["messages"], "messages")
    if "conversations" in obj:
        return _chat_list(obj["conversations"], "conversations", "from", "value", _SHAREGPT_ROLES)
    if "prompt" in obj and "completion" in obj:
        return _turns(obj["prompt"], "user", "prompt") + _turns(obj["completion"], "assistant", "completion")
    if "instruction" in obj and "output" in obj:
        system = [{"role": "system", "content": _text(obj["system"], "system")}] if obj.get("system") else []
        instruction = _text(obj["instruction"], "instruction")
        extra = obj.get("input") or ""
        user = instruction if not extra else f"{instruction}\n\n{_text(extra, 'input')}"
        return system + [{"role": "user", "content": user},
                         {"role": "assistant", "content": _text(obj["output"], "output")}]
    keys = sorted(obj)[:6]
    raise RecordError("unknown_format", f"no messages/conversations/prompt+completion/instruction+output "
                                        f"keys (found {keys})")


def _clean(messages: list[dict[str, str]], max_chars: int, where: str = "messages") -> list[dict[str, str]]:
    """Check each message's text, which stays as written: control characters, blank turns (nothing but
    spaces and invisible characters) and oversize records are defects."""
    total = 0
    for i, m in enumerate(messages):
        content = m["content"]
        control = _CONTROL.search(content)
        if control:
            raise RecordError("control_characters",
                              f"{where}[{i}] contains control character U+{ord(control.group()):04X}")
        if not normalise_text(content).strip():
            raise RecordError("blank_content", f"{where}[{i}] ({m['role']}) has no text")
        total += len(content)
    if total > max_chars:
        raise RecordError("too_long", f"{total} characters of content (limit {max_chars})")
    return messages


def to_messages(obj: Any, max_chars: int, max_depth: int) -> list[dict[str, str]]:
    """Validated, normalised chat messages of one parsed record."""
    if depth(obj, max_depth) > max_depth:
        raise RecordError("too_deep", f"nesting deeper than {max_depth} levels")
    messages = canonical(obj)
    if not messages:
        raise RecordError("empty_conversation", "no messages")
    _clean(messages, max_chars)
    roles = [m["role"] for m in messages]
    if "user" not in roles:
        raise RecordError("no_user_turn", "conversation has no user message")
    if roles[-1] != "assistant":
        raise RecordError("no_assistant_turn", "conversation does not end with an assistant answer")
    return messages


def to_preference(obj: Any, max_chars: int, max_depth: int) -> list[dict[str, str]]:
    """A preference record ``{"prompt", "chosen", "rejected"}`` as messages: the prompt turns, then the
    chosen answer, then the rejected one (roles ``assistant``), validated like chat records."""
    if depth(obj, max_depth) > max_depth:
        raise RecordError("too_deep", f"nesting deeper than {max_depth} levels")
    if not isinstance(obj, dict):
        raise RecordError("not_an_object", f"top level is {type(obj).__name__}, expected an object")
    missing = sorted({"prompt", "chosen", "rejected"} - set(obj))
    if missing:
        raise RecordError("unknown_format", f"preference record lacks {missing}")
    prompt = _turns(obj["prompt"], "user", "prompt")
    answers = []
    for side in ("chosen", "rejected"):
        turns = _turns(obj[side], "assistant", side)
        if not turns or turns[-1]["role"] != "assistant":
            raise RecordError("no_assistant_turn", f"{side} does not end with an assistant answer")
        answers.append(turns[-1])
    messages = _clean(prompt + answers, max_chars)
    if "user" not in [m["role"] for m in prompt]:
        raise RecordError("no_user_turn", "prompt has no user message")
    return messages


def prompt_text(messages: list[dict[str, str]], answers: int = 1) -> str:
    """The text the model is asked about: all turns but the final answer(s)."""
    return "\n".join(m["content"] for m in messages[:-answers])
