"""PII and secret redaction with typed placeholders, the same everywhere text is stored or logged.

``build_redactor(sanitize_config)`` gives the one redactor that sanitize, augment, the request and
feedback logs and the leak probe use: the structured detectors (pipeline/pii/patterns.py), the
contextual ones for names, addresses, dates of birth and id numbers (pipeline/pii/context.py), an
optional model-based recogniser (pipeline/pii/model.py) and the user's ``custom_pii`` patterns.

Text is **read** through a normalised view (NFKC, format characters such as zero-width joiners and bidi
controls removed) so invisible or compatibility characters cannot split a value, but it is **written** as
the user wrote it: each value found in the view is mapped back to its span in the original, and only that
span is replaced. Detectors run in a fixed order; each one's matches are masked for the detectors after
it, so a value is redacted once and a part of a kept value (a tracking number) is never redacted.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pipeline.pii.context import AddressDetector, NameDetector, Words, cue_detectors, early_detectors
from pipeline.pii.gazetteer import load as load_gazetteer
from pipeline.pii.patterns import (PLACEHOLDERS, Detector, build_detectors, card_ok, iban_ok,  # noqa: F401
                                   luhn_ok, phone_ok)

if TYPE_CHECKING:
    from pipeline.config import SanitizeConfig

PLACEHOLDERS.update({"NAME": "<NAME>", "ADDRESS": "<ADDRESS>", "DOB": "<DOB>", "ID_NUMBER": "<ID_NUMBER>"})
_MASK = "\x00"  # stands in for a found value in the text later detectors see (a non-word character)


class SpanFinder(Protocol):
    kind: str

    def spans(self, text: str, words: Words | None = None) -> list[tuple[int, int]]: ...


# ---- the normalised view -------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _format_class() -> re.Pattern[str]:
    cps = [cp for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)) == "Cf"]
    return re.compile("[" + "".join(re.escape(chr(c)) for c in cps) + "]")


def normalised_view(text: str) -> tuple[str, list[int] | None, list[int] | None]:
    """``text`` as detectors should read it (NFKC, no format characters), with, for each character of the
    view, the start and end of the original characters it came from (None, None: the view is the text)."""
    fmt = _format_class()
    if text.isascii() or (unicodedata.is_normalized("NFKC", text) and not fmt.search(text)):
        return text, None, None
    out: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    i, n = 0, len(text)
    while i < n:
        j = i + 1
        while j < n and unicodedata.combining(text[j]):  # a base character with its combining marks
            j += 1
        norm = fmt.sub("", unicodedata.normalize("NFKC", text[i:j]))
        out.append(norm)
        starts.extend([i] * len(norm))
        ends.extend([j] * len(norm))
        i = j
    return "".join(out), starts, ends


def normalise_text(text: str) -> str:
    """The normalised view alone: for dedup keys and comparisons, never for what is stored."""
    return normalised_view(text)[0]


# ---- the redactor --------------------------------------------------------------------------------
_DIGIT_RUN = re.compile(r"\d[\d ().-]{5,}\d")


@dataclass
class Redactor:
    finders: list[Detector | SpanFinder]
    recogniser: SpanFinder | None = None  # a model: runs on the whole view, fills gaps the rules left

    def spans(self, text: str) -> list[tuple[int, int, str, str]]:
        """(start, end, kind, value) of every value to redact, in original coordinates, sorted."""
        view, starts, ends = normalised_view(text)
        work = view
        found: list[tuple[int, int, str]] = []  # view coordinates
        taken: list[tuple[int, int]] = []
        digit_run: bool | None = None
        words: Words | None = None  # the view's words, split once when a contextual detector asks
        for det in self.finders:
            if isinstance(det, Detector):
                if det.triggers is not None:
                    words = words or Words(work)
                    if det.triggers.isdisjoint(words.lower):
                        continue
                if det.needs_digit_run:
                    if digit_run is None:
                        digit_run = _DIGIT_RUN.search(work) is not None
                    if not digit_run:
                        continue
                if not det.prescan(work):
                    continue
                hits = [det.span(m) for m in det.pattern.finditer(work) if det.verify is None or det.verify(m)]
                keep = det.keep
            else:
                # Earlier values are masked in ``work``, not removed: the words computed before still
                # tell a detector whether to run; its regexes read the masked text.
                words = words or Words(work)
                words.text = work
                hits = det.spans(work, words)
                keep = False
            hits = [(s, e) for s, e in hits if e > s and _MASK not in work[s:e]]
            if not hits:
                continue
            pieces, pos = [], 0
            for s, e in hits:
                pieces += [work[pos:s], _MASK * (e - s)]
                pos = e
            work = "".join(pieces) + work[pos:]
            taken += hits
            if not keep:
                found += [(s, e, det.kind) for s, e in hits]
        if self.recogniser is not None:
            for s, e in self.recogniser.spans(view):
                kind = getattr(self.recogniser, "last_kinds", {}).get((s, e), self.recogniser.kind)
                if not any(s < te and ts < e for ts, te in taken):
                    found.append((s, e, kind))
                    taken.append((s, e))
        out = []
        for s, e, kind in sorted(found):
            os_, oe = (s, e) if starts is None else (starts[s], ends[e - 1])
            out.append((os_, oe, kind, view[s:e]))
        return out

    def redact(self, text: str, found: list[str] | None = None) -> tuple[str, Counter[str]]:
        counts: Counter[str] = Counter()
        spans = self.spans(text)
        if not spans:
            return text, counts
        pieces, pos = [], 0
        for s, e, kind, value in spans:
            if s < pos:  # two view spans inside one original character: already replaced
                continue
            pieces += [text[pos:s], PLACEHOLDERS.get(kind, f"<{kind}>")]
            pos = e
            counts[kind] += 1
            if found is not None:
                found.append(value)
        return "".join(pieces) + text[pos:], counts


DEFAULT_NAME_LOCALES = ["*"]


def make_redactor(regions: tuple[str, ...] = ("US", "GB", "DE", "FR"), custom: dict[str, str] | None = None,
                  names: bool = True, name_locales: tuple[str, ...] = tuple(DEFAULT_NAME_LOCALES),
                  keep_names: tuple[str, ...] = (), addresses: bool = True, dates_of_birth: bool = True,
                  id_numbers: bool = True, recogniser: SpanFinder | None = None) -> Redactor:
    structured = build_detectors(regions)
    cut = next(i for i, d in enumerate(structured) if d.kind == "IBAN")
    # Secrets and e-mail first; then what must precede cards, IBANs and phones (tracking numbers, kept;
    # checksummed national ids); the values known by their cue; addresses before phone numbers, which would
    # take a part of one; names last.
    finders: list[Detector | SpanFinder] = structured[:cut] + early_detectors(id_numbers)
    finders += [d for d in structured[cut:] if d.kind != "PHONE"] + cue_detectors(dates_of_birth, id_numbers)
    phone = [d for d in structured if d.kind == "PHONE"]
    if addresses:
        finders.append(AddressDetector(regions))
    finders += phone
    if names:
        finders.append(NameDetector(load_gazetteer(tuple(name_locales), tuple(keep_names))))
    for name, pattern in (custom or {}).items():
        finders.append(Detector(name.upper(), re.compile(pattern), lambda t: True))
    return Redactor(finders, recogniser)


def build_redactor(cfg: SanitizeConfig | None = None) -> Redactor:
    """The redactor ``sanitize:`` configures (the defaults when None); the model, if any, is loaded once."""
    if cfg is None:
        return _default()
    pii = cfg.pii
    recogniser = None
    if pii.recogniser is not None:
        from pipeline.pii.model import load_recogniser

        recogniser = load_recogniser(pii.recogniser)
    return make_redactor(tuple(r.upper() for r in cfg.phone_regions), cfg.custom_pii, pii.names,
                         tuple(pii.name_locales), tuple(pii.keep_names), pii.addresses, pii.dates_of_birth,
                         pii.id_numbers, recogniser)


@lru_cache(maxsize=1)
def _default() -> Redactor:
    return make_redactor()


def redact(text: str, redactor: Redactor | None = None,
           found: list[str] | None = None) -> tuple[str, Counter[str]]:
    """Return the text with PII and secrets replaced by typed placeholders, and counts by type.
    ``found``, when given, receives each replaced value (in memory only: callers keep digests)."""
    return (redactor or _default()).redact(text, found)


# ---- keyed digests of redacted values ------------------------------------------------------------
# The leak probe must know which values the sanitizer removed without any file holding them: sanitize
# keeps an HMAC of each (plain hashes of phone or card numbers can be reversed by enumeration), keyed by
# a local secret that never leaves the machine (LORAFLOW_PII_KEY, or a 0600 file created on first use).
# The digest file's first line names the key by its own digest, so a probe run under another key (or
# none) stops instead of finding nothing.
PII_KEY_ENV = "LORAFLOW_PII_KEY"
PII_KEY_FILE = Path(".loraflow/pii.key")
KEY_LINE = "# key "


class DigestKeyMismatch(RuntimeError):
    """The PII digests were written under a key this process does not have."""


def digest_key(key_file: Path = PII_KEY_FILE, create: bool = True) -> bytes:
    import os
    import secrets

    env = os.environ.get(PII_KEY_ENV, "")
    if env:
        return env.encode()
    if not key_file.is_file():
        if not create:
            raise DigestKeyMismatch(f"no PII digest key: set {PII_KEY_ENV} or restore {key_file} (the key the "
                                    "sanitize stage used); without it the leak probe cannot recognise any value")
        key_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return key_file.read_text().strip().encode()


def key_id(key: bytes) -> str:
    """A public name of a key (a digest of a digest: reveals nothing about the key)."""
    import hashlib

    return hashlib.sha256(b"loraflow-pii-key-id:" + hashlib.sha256(key).digest()).hexdigest()[:16]


def value_digest(value: str, key: bytes) -> str:
    """Keyed digest of a value, insensitive to case and separators (``555-0100`` = ``555 0100``)."""
    import hashlib
    import hmac

    norm = re.sub(r"[\W_]+", "", normalise_text(value).lower())
    return hmac.new(key, norm.encode(), hashlib.sha256).hexdigest()[:32]


def write_digests(path: Path, digests: set[str], key: bytes) -> None:
    path.write_text(f"{KEY_LINE}{key_id(key)}\n" + "".join(f"{d}\n" for d in sorted(digests)), encoding="utf-8")


def read_digests(paths: list[Path], key: bytes) -> set[str]:
    """Digests from sanitize's files; raises ``DigestKeyMismatch`` when one was written under another key
    (a file without a key line predates keyed files and is refused the same way)."""
    want = key_id(key)
    out: set[str] = set()
    for path in paths:
        if not path.is_file():
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        head = lines[0] if lines else ""
        if not head.startswith(KEY_LINE) or head[len(KEY_LINE):].strip() != want:
            raise DigestKeyMismatch(
                f"{path}: written under a different PII key than this run's ({PII_KEY_ENV} or {PII_KEY_FILE}); "
                "the leak probe would find nothing. Use the key the sanitize stage used, or re-run sanitize "
                "with this one (loraflow run)")
        out.update(line.strip() for line in lines[1:] if line.strip())
    return out


def pii_digests(text: str, redactor: Redactor, key: bytes) -> set[str]:
    """Digests of every PII value the redactor finds in ``text``."""
    found: list[str] = []
    redactor.redact(text, found)
    return {value_digest(v, key) for v in found}


# ---- configuration that is logged ----------------------------------------------------------------
_SECRET_KEY = re.compile(r"(?i)(?:^|[_.\-])(?:token|key|secret|password|passwd|pwd|credentials?|auth)(?:$|[_.\-])")
SECRET_SECTIONS = ("serve.env",)  # environment passed to vLLM: tokens live there (HF_TOKEN)


def mask_secrets(config: dict, prefix: str = "") -> dict:
    """A copy of ``config`` fit for MLflow params and reports: values under keys named like secrets
    (``*token*``, ``*key*``, ``*secret*``, ``*password*``, as a word of the key: ``max_new_tokens`` stays),
    everything under ``serve.env``, and secrets inside strings (a password in a database URL) become
    ``<redacted>`` or their placeholder."""
    out: dict = {}
    for k, v in config.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        if any(path == s or path.startswith(s + ".") for s in SECRET_SECTIONS) and not isinstance(v, dict):
            out[k] = "<redacted>" if v not in (None, "", {}) else v
        elif isinstance(v, dict):
            out[k] = mask_secrets(v, path) if not (path in SECRET_SECTIONS) else {n: "<redacted>" for n in v}
        elif _SECRET_KEY.search(str(k)) and v not in (None, "", [], {}) and not isinstance(v, bool):
            out[k] = "<redacted>"
        elif isinstance(v, str):
            out[k] = redact(v)[0] if ("@" in v or "earer" in v or "PRIVATE" in v or "eyJ" in v) else v
        else:
            out[k] = v
    return out
