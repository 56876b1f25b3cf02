"""Structured values: secrets, e-mail, IBAN, card, SSN, IP address, phone number.

Each detector has a cheap pre-scan (a substring or one compiled search) so text that cannot contain its
type skips it; that is what keeps sanitize fast on mostly clean data. Values that need it are verified:
card numbers by Luhn, IBANs by their mod-97 checksum, IP addresses by ``ipaddress``, phone numbers by
``phonenumbers`` for the configured regions. Order numbers, versions, dates, amounts, tracking numbers and
ticket ids are left alone.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

import phonenumbers

# ---- secrets -------------------------------------------------------------------------------------
_PRIVATE_KEY = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----.*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|\Z)",
                          re.S)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{10,}")
_AWS_KEY = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b")
_BEARER = re.compile(r"\b(?:[Bb]earer|BEARER)\s+(?P<v>[A-Za-z0-9\-._~+/]{16,}=*)")
_URL_CREDS = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://(?P<v>[^\s/:@]+:[^\s/@]+)@")

# ---- personal data -------------------------------------------------------------------------------
# Local part: every character RFC 5322 allows unquoted, so unusual addresses are not missed.
_LOCAL = r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]"
_EMAIL = re.compile(rf"(?<!{_LOCAL}){_LOCAL}+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{{2,}}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
_CARD = re.compile(r"(?<![\w-])(?:\d[ -]?){11,18}\d(?![\w-])")
_SSN = re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# Phone-shaped: optional +/00 prefix, digit groups joined by space, dot, dash or parentheses, optional
# extension. phonenumbers then decides whether it is a possible number.
# The look-ahead also refuses a following ":digit", so "2026-03-02 14:05" offers no "2026-03-02 14" candidate.
_PHONE = re.compile(r"(?<![\w+.-])(?:\+|00)?\(?\d{1,4}\)?(?:[ .-]?\(?\d{1,5}\)?){1,7}(?:\s?(?:x|ext\.?)\s?\d{1,5})?(?![\w:-]|[.:]\d)")
_SSN_SHAPE = re.compile(r"^\d{3}-\d{2}-\d{4}$")
_AREA_CODE = re.compile(r"^\(\d{2,5}\)\s?\d")
_DATE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")
# A date at the start (2026-03-02 ..., 2026.03.02.1405) or a compact yyyymmdd first group (20260302.1405,
# 20260302-140533): timestamps and build numbers, not phones.
_DATE_PREFIX = re.compile(r"^(?:19|20)\d\d(?:[-./](?:0?[1-9]|1[0-2])[-./](?:0?[1-9]|[12]\d|3[01])|"
                          r"(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]))(?!\d)")
_GROUPS = re.compile(r"\d+")
# Words that make a bare digit run (no separators) a phone number; without one it is an id or a timestamp.
_PHONE_CUE = re.compile(r"(?i)(?:phone|call|tel|mobile|cell|fax|whatsapp|sms|text me|reach me|dial)\W{0,3}"
                        r"(?:\w+\W+){0,3}$")
_DIGIT_RUN = re.compile(r"\d[\d ().-]{5,}\d")

PLACEHOLDERS = {
    "PRIVATE_KEY": "<PRIVATE_KEY>", "JWT": "<JWT>", "AWS_ACCESS_KEY": "<AWS_ACCESS_KEY>",
    "BEARER_TOKEN": "<TOKEN>", "URL_CREDENTIALS": "<CREDENTIALS>", "EMAIL": "<EMAIL>", "IBAN": "<IBAN>",
    "CARD": "<CARD>", "SSN": "<SSN>", "IP_ADDRESS": "<IP_ADDRESS>", "PHONE": "<PHONE>",
}


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


def card_ok(digits: str) -> bool:
    """Luhn-valid and of a card length; 12 digits only for Maestro ranges (ids of 12 digits are common)."""
    if len(digits) == 12:
        return digits.startswith(("50", "56", "57", "58", "6")) and luhn_ok(digits)
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def card_grouping_ok(text: str) -> bool:
    """Card numbers are written whole or in blocks of four (Amex/Diners: 4-6-5, 4-6-4); other groupings
    (order ids like 279-4794634-4794634, run ids like 20120204-176350) are not cards even when Luhn passes."""
    groups = [len(g) for g in re.findall(r"\d+", text)]
    if len(groups) == 1:
        return True
    return groups in ([4, 6, 5], [4, 6, 4]) or (all(g == 4 for g in groups[:-1]) and 1 <= groups[-1] <= 4)


def iban_ok(value: str) -> bool:
    s = value.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def isbn13_ok(digits: str) -> bool:
    if len(digits) != 13 or not digits.startswith(("978", "979")):
        return False
    return sum(int(d) * (1 if i % 2 == 0 else 3) for i, d in enumerate(digits)) % 10 == 0


def _digits(s: str) -> str:
    return "".join(c for c in s if c.isdigit())


def isbn10_ok(candidate: str) -> bool:
    chars = [c for c in candidate if c.isdigit() or c in "xX"]
    if len(chars) != 10 or not all(c.isdigit() for c in chars[:9]):
        return False
    values = [int(c) for c in chars[:9]] + [10 if chars[9] in "xX" else int(chars[9])]
    return sum((10 - i) * v for i, v in enumerate(values)) % 11 == 0


def _valid_somewhere(number: str, regions: tuple[str, ...]) -> bool:
    for region in regions:
        try:
            if phonenumbers.is_valid_number(phonenumbers.parse(number, region)):
                return True
        except phonenumbers.NumberParseException:
            continue
    return False


def phone_ok(candidate: str, regions: tuple[str, ...], before: str = "") -> bool:
    """Whether a phone-shaped ``candidate`` is a phone number; ``before`` is the text preceding it."""
    digits = _digits(candidate.split("x")[0].split("ext")[0])
    if not 7 <= len(digits) <= 15 or _DATE.match(candidate) or _SSN_SHAPE.match(candidate) or isbn13_ok(digits):
        return False
    international = candidate.startswith(("+", "00"))
    groups = _GROUPS.findall(candidate)
    if not international:
        # An ISBN-10 is hyphenated with a one-character check group at the end (0-306-40615-2).
        if _DATE_PREFIX.match(candidate) or (candidate[-2:-1] == "-" and isbn10_ok(candidate)):
            return False
        # Dotted digit groups longer than a phone group: versions (10.0.19045.3803), decimals, builds.
        if "." in candidate and set(candidate) <= set("0123456789.") and max(len(g) for g in groups) >= 5:
            return False
        # Blocks of four (7489 2300 1234): tracking, account and card-like ids, not phone groupings.
        if len(groups) >= 3 and all(len(g) == 4 for g in groups):
            return False
        # A bare digit run is an id, a timestamp or an amount unless the words before it ask for a call,
        # or it is written with a national trunk prefix (0...) and is a valid number of a configured region.
        if candidate.isdigit() and not _PHONE_CUE.search(before[-40:]):
            return candidate.startswith("0") and _valid_somewhere(candidate, regions)
    text = candidate
    if text.startswith("00") and not text.startswith("001-"):
        text = "+" + text[2:]
    for region in regions:
        try:
            num = phonenumbers.parse(text, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_possible_number(num):
            return True
    # US exports often write "001-" as a dialling prefix, which phonenumbers does not accept; a
    # parenthesised area code followed by the subscriber number is a phone whatever the region.
    return (candidate.startswith("001-") and len(digits) in (13, 14)) or \
        (_AREA_CODE.match(candidate) is not None and len(digits) >= 9)


@dataclass(frozen=True)
class Detector:
    kind: str
    pattern: re.Pattern[str]
    prescan: Callable[[str], bool]
    verify: Callable[[re.Match[str]], bool] | None = None
    needs_digit_run: bool = False  # skip unless the text has 7+ digits in a row (tested once per text)
    # A value that is not personal but looks like one (a parcel tracking number): it is left as written
    # and hidden from the detectors after it, so none of them redacts a part of it.
    keep: bool = False
    # Lower-cased words one of which the text must contain for the pattern to be tried (cue words).
    triggers: frozenset[str] | None = None

    def span(self, m: re.Match[str]) -> tuple[int, int]:
        """The part of a match that is the value: the group ``v`` when the pattern has one (the token
        after "Bearer", the user:password of a URL), else the whole match."""
        return m.span("v") if "v" in m.re.groupindex else m.span()

    @property
    def placeholder(self) -> str:
        return PLACEHOLDERS.get(self.kind, f"<{self.kind}>")


def _ip_ok(m: re.Match[str]) -> bool:
    try:
        ip = ipaddress.ip_address(m.group())
    except ValueError:
        return False
    # "::" alone or a version like 1.2.3.4 with a loopback/unspecified value carries no personal data.
    return not (ip.is_unspecified or (ip.version == 6 and m.group().count(":") < 3 and "." not in m.group()))


_AWS_PREFIXES = ("AKIA", "ASIA", "AGPA", "AIDA", "AROA", "ANPA", "ANVA", "AIPA")


def build_detectors(regions: tuple[str, ...] = ("US", "GB", "DE", "FR"),
                    custom: dict[str, str] | None = None) -> list[Detector]:
    regions = tuple(r.upper() for r in regions)
    anything = bool  # prescan for detectors gated only on the digit run
    detectors = [
        Detector("PRIVATE_KEY", _PRIVATE_KEY, lambda t: "PRIVATE KEY" in t),
        Detector("JWT", _JWT, lambda t: "eyJ" in t),
        Detector("AWS_ACCESS_KEY", _AWS_KEY, lambda t: any(p in t for p in _AWS_PREFIXES)),
        Detector("BEARER_TOKEN", _BEARER, lambda t: "earer" in t or "EARER" in t),
        Detector("URL_CREDENTIALS", _URL_CREDS, lambda t: "://" in t and "@" in t),
        Detector("EMAIL", _EMAIL, lambda t: "@" in t),
        Detector("IBAN", _IBAN, anything, lambda m: iban_ok(m.group()), needs_digit_run=True),
        Detector("CARD", _CARD, anything, lambda m: card_grouping_ok(m.group()) and card_ok(_digits(m.group())),
                 needs_digit_run=True),
        Detector("SSN", _SSN, lambda t: "-" in t, needs_digit_run=True),
        Detector("IP_ADDRESS", _IPV4, lambda t: "." in t, _ip_ok, needs_digit_run=True),
        Detector("IP_ADDRESS", _IPV6, lambda t: "::" in t or t.count(":") >= 5, _ip_ok),
        Detector("PHONE", _PHONE, anything, lambda m: phone_ok(m.group(), regions, m.string[:m.start()]),
                 needs_digit_run=True),
    ]
    for name, pattern in (custom or {}).items():
        detectors.append(Detector(name.upper(), re.compile(pattern), lambda t: True))
    return detectors
