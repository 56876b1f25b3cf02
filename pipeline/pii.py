"""PII redaction with typed placeholders: ``<EMAIL>``, ``<CARD>``, ``<PHONE>``.

Card numbers must pass the Luhn check, so order numbers and other long digit runs survive. Phone
numbers need a plausible shape (country code or area code, 9-15 digits) and are matched after cards.
"""

from __future__ import annotations

import re
from collections import Counter

# Local part: every character RFC 5322 allows unquoted, so unusual addresses are not missed.
_LOCAL = r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]"
_EMAIL = re.compile(rf"(?<!{_LOCAL}){_LOCAL}+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{{2,}}\b")
_CARD = re.compile(r"(?<![\w-])(?:\d[ -]?){12,18}\d(?![\w-])")
_PHONE = re.compile(r"(?<![\w-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,3}(?![\w-])")


def luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card(m: re.Match[str]) -> str | None:
    digits = re.sub(r"\D", "", m.group())
    return "<CARD>" if 13 <= len(digits) <= 19 and luhn_ok(digits) else None


def _phone(m: re.Match[str]) -> str | None:
    s = m.group()
    digits = re.sub(r"\D", "", s)
    # A phone number has a country or area code marker, or is long enough to be one; bare years,
    # amounts and version numbers are not.
    looks_dialled = s.startswith("+") or s.startswith("(")
    return "<PHONE>" if 9 <= len(digits) <= 15 and (looks_dialled or len(digits) >= 10) else None


def redact(text: str) -> tuple[str, Counter[str]]:
    """Return the text with PII replaced and the number of replacements by type."""
    counts: Counter[str] = Counter()

    def sub(pattern: re.Pattern[str], kind: str, check, s: str) -> str:
        def repl(m: re.Match[str]) -> str:
            out = check(m)
            if out is None:
                return m.group()
            counts[kind] += 1
            return out
        return pattern.sub(repl, s)

    if "@" in text:
        text = sub(_EMAIL, "EMAIL", lambda m: "<EMAIL>", text)
    if any(ch.isdigit() for ch in text):
        text = sub(_CARD, "CARD", _card, text)
        text = sub(_PHONE, "PHONE", _phone, text)
    return text, counts
