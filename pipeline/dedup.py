"""Exact duplicates, label conflicts and verified near-duplicates, in bounded memory.

- **Exact**: a 64-bit digest of the whole normalised record, its answer in canonical form (the caller
  passes the task parser's form, so the same JSON with other whitespace is the same answer); the same
  prompt with the same canonical answer is an exact duplicate too.
- **Label conflict**: the same prompt seen before with a different canonical answer (the caller
  quarantines both).
- **Near**: MinHash signatures of Unicode word shingles (pipeline/text.py: any script; characters of
  unspaced scripts such as Chinese and Japanese), banded for LSH. A band hit is only a *candidate*: it
  counts as a near-duplicate when the exact shingle Jaccard similarity reaches the threshold **and** the
  two records carry the same values (numbers and ids; no capitalised name in one that the other lacks)
  **and** the same answer. Records that share a template and differ in a value are distinct
  examples, so they are kept. Because every candidate is verified, the LSH bands are tuned below the
  threshold (more candidates, higher recall) without costing precision.

Memory: digests and band keys live in numpy open-addressing tables (``IntSet``, ``IntMap``: 16-24 bytes
an entry at load <= 0.5); the prompts needed for verification are appended to an anonymous temporary
file and read back by offset, so they cost disk, not RAM. The stored prompts are the sanitized ones.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import unicodedata
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from pipeline.text import tokens

_PRIME = np.uint64((1 << 31) - 1)  # Mersenne prime; a*x stays below 2**63 for 32-bit x
_WORD = re.compile(r"[^\W_]+")
_SPACE = re.compile(r"\s+")
# Records kept per LSH bucket. Templated data fills buckets with records that share most of their text
# but differ in a value; more than one per bucket lets a true duplicate still meet its original.
BUCKET_CAP = 4


def record_text(messages: list[dict[str, str]]) -> str:
    """The text a chat record is deduplicated on: every message with its role."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def digest64(data: str | bytes) -> int:
    """A non-zero signed 64-bit digest (0 marks empty slots); stable across processes."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little", signed=True) or 1


def _slot(table: np.ndarray, mask: int, key: int) -> int:
    i = (key * 0x9E3779B1) & mask
    while True:
        v = table[i]
        if v == 0 or v == key:
            return i
        i = (i + 1) & mask


class IntSet:
    """A growable set of int64 keys in a numpy array (linear probing, load factor <= 0.5)."""

    def __init__(self, capacity: int = 1 << 12) -> None:
        self._table = np.zeros(capacity, dtype=np.int64)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        return self._table.nbytes

    def __contains__(self, key: int) -> bool:
        return self._table[_slot(self._table, len(self._table) - 1, key)] == key

    def add(self, key: int) -> bool:
        """Insert ``key``; returns False if it was already present."""
        i = _slot(self._table, len(self._table) - 1, key)
        if self._table[i] == key:
            return False
        self._table[i] = key
        self._size += 1
        if self._size * 2 > len(self._table):
            old = self._table[self._table != 0]
            self._table = np.zeros(len(self._table) * 2, dtype=np.int64)
            mask = len(self._table) - 1
            for k in old.tolist():
                self._table[_slot(self._table, mask, k)] = k
        return True


class IntMap:
    """Integer key -> int32 value(s): a map (``setdefault``, first writer wins) or a capped multimap
    (``add``/``get_all``); same layout as IntSet plus a value array. ``key_bits=32`` halves the key
    array for keys whose rare collisions are harmless (LSH band keys: every candidate is verified)."""

    def __init__(self, capacity: int = 1 << 12, key_bits: int = 64, max_load: float = 0.5) -> None:
        self._dtype = np.int64 if key_bits == 64 else np.int32
        self._fold = key_bits == 32
        self._max_load = max_load
        self._keys = np.zeros(capacity, dtype=self._dtype)
        self._vals = np.zeros(capacity, dtype=np.int32)
        self._size = 0

    def _key(self, key: int) -> int:
        if not self._fold:
            return key
        return ((key ^ (key >> 32)) & 0x7FFFFFFF) or 1

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._vals.nbytes

    def get(self, key: int) -> int | None:
        key = self._key(key)
        i = _slot(self._keys, len(self._keys) - 1, key)
        return int(self._vals[i]) if self._keys[i] == key else None

    def get_all(self, key: int) -> list[int]:
        """Every value stored under ``key`` (``add`` keeps several)."""
        key = self._key(key)
        keys, mask = self._keys, len(self._keys) - 1
        i, out = (key * 0x9E3779B1) & mask, []
        while keys[i] != 0:
            if keys[i] == key:
                out.append(int(self._vals[i]))
            i = (i + 1) & mask
        return out

    def add(self, key: int, value: int, cap: int) -> None:
        """Store ``value`` under ``key`` unless ``cap`` values are stored there already (a multimap)."""
        key = self._key(key)
        keys, mask = self._keys, len(self._keys) - 1
        i, n = (key * 0x9E3779B1) & mask, 0
        while keys[i] != 0:
            n += keys[i] == key
            i = (i + 1) & mask
        if n >= cap:
            return
        keys[i], self._vals[i] = key, value
        self._size += 1
        if self._size > self._max_load * len(keys):
            self._grow()

    def _grow(self) -> None:
        live = self._keys != 0
        keys, vals = self._keys[live], self._vals[live]
        self._keys = np.zeros(len(self._keys) * 2, dtype=self._dtype)
        self._vals = np.zeros(len(self._keys), dtype=np.int32)
        mask = len(self._keys) - 1
        for k, v in zip(keys.tolist(), vals.tolist()):
            j = (k * 0x9E3779B1) & mask
            while self._keys[j] != 0:
                j = (j + 1) & mask
            self._keys[j], self._vals[j] = k, v

    def setdefault(self, key: int, value: int) -> int:
        key = self._key(key)
        i = _slot(self._keys, len(self._keys) - 1, key)
        if self._keys[i] == key:
            return int(self._vals[i])
        self._keys[i], self._vals[i] = key, value
        self._size += 1
        if self._size > self._max_load * len(self._keys):
            self._grow()
        return value


class _Column:
    """A growable int64 array indexed by record id."""

    def __init__(self) -> None:
        self.data = np.zeros(1 << 12, dtype=np.int64)
        self.size = 0

    def append(self, value: int) -> None:
        if self.size == len(self.data):
            self.data = np.concatenate([self.data, np.zeros_like(self.data)])
        self.data[self.size] = value
        self.size += 1


class PromptStore:
    """Prompts appended to an anonymous temporary file, read back by record id (disk, not RAM)."""

    def __init__(self) -> None:
        self._fh = tempfile.TemporaryFile(buffering=0)
        self._ends = _Column()

    def append(self, text: str) -> None:
        self._fh.write(text.encode("utf-8"))
        self._ends.append(self._fh.tell())

    def get(self, record_id: int) -> str:
        end = int(self._ends.data[record_id])
        start = int(self._ends.data[record_id - 1]) if record_id else 0
        return os.pread(self._fh.fileno(), end - start, start).decode("utf-8")

    def close(self) -> None:
        self._fh.close()


def choose_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm whose S-curve midpoint is nearest the threshold."""
    best = (1, num_perm)
    for b in range(1, num_perm + 1):
        r = num_perm // b
        if abs((1 / b) ** (1 / r) - threshold) < abs((1 / best[0]) ** (1 / best[1]) - threshold):
            best = (b, r)
    return best


def shingles(text: str, k: int) -> set[str]:
    words = tokens(text)
    if len(words) <= k:
        return {" ".join(words)}
    return {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _sentence_initial(text: str, start: int) -> bool:
    before = text[:start].rstrip(" \t\"'([“‘«")
    return not before or before[-1] in ".!?:;\n"


def names(text: str) -> set[str]:
    """Capitalised words that do not start a sentence (case-folded): names, places, products."""
    return {m.group().casefold() for m in _WORD.finditer(text)
            if m.group()[0].isupper() and any(c.islower() for c in m.group()[1:])
            and not _sentence_initial(text, m.start())}


def same_values(a: str, b: str) -> bool:
    """Whether two texts carry the same values: the same numbers and ids (as a multiset), and no name in
    one that the other lacks. Two records that differ in a value (an id, a year, a number, a name) are
    different examples even when the rest of their wording is the same; a word that is only capitalised
    differently ("monday"/"Monday", an all-caps re-send) is not a different value.
    """
    ta, tb = tokens(a), tokens(b)
    if sorted(t for t in ta if any(c.isdigit() for c in t)) != sorted(t for t in tb if any(c.isdigit() for c in t)):
        return False
    sa, sb = set(ta), set(tb)
    return names(a) <= sb and names(b) <= sa


def text_key(answer: str) -> str:
    """An answer's canonical form when nothing knows its meaning better: up to case and whitespace."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", answer).casefold()).strip()


class MinHasher:
    def __init__(self, num_perm: int = 64, shingle: int = 3, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        # h(x) = (a*x + b) mod p with a, b < p: a universal family; a*x < 2**63 cannot overflow.
        self.a = rng.integers(1, int(_PRIME), num_perm, dtype=np.uint64)
        self.b = rng.integers(0, int(_PRIME), num_perm, dtype=np.uint64)
        self.shingle = shingle

    def signature_of(self, grams: set[str]) -> np.ndarray:
        h = np.fromiter((zlib.crc32(s.encode()) for s in grams), dtype=np.uint64)
        return ((np.outer(h, self.a) + self.b) % _PRIME).min(axis=0)

    def signature(self, text: str) -> np.ndarray:
        return self.signature_of(shingles(text, self.shingle))


class LshKeys:
    """A prompt's LSH band keys: MinHash over word shingles, banded. Candidates are verified, so the
    S-curve sits below the threshold: recall without false positives."""

    def __init__(self, num_perm: int = 64, shingle: int = 3, threshold: float = 0.85) -> None:
        self.hasher = MinHasher(num_perm, shingle)
        self.bands, self.rows = choose_bands(num_perm, max(0.3, threshold - 0.1))

    @property
    def settings(self) -> tuple:
        return (len(self.hasher.a), self.hasher.shingle, self.bands, self.rows)

    def keys(self, prompt: str) -> tuple[int, ...]:
        sig = self.hasher.signature(prompt)
        r = self.rows
        return tuple(digest64(i.to_bytes(2, "little") + sig[i * r:(i + 1) * r].tobytes()) for i in range(self.bands))


class Keys(NamedTuple):
    """Digests of the whole record, its prompt and its canonical answer, and the prompt's band keys."""

    record: int
    prompt: int
    answer: int
    bands: tuple[int, ...]

    @classmethod
    def of(cls, record: str, prompt: str, answer: str, lsh: LshKeys | None) -> "Keys":
        """A pure function of the text and the settings: computed anywhere (sanitize's Dask workers),
        decided by ``Deduplicator.check_keys``. No ``lsh``: no band keys (exact dedup only)."""
        return cls(digest64(record), digest64(prompt), digest64(answer), lsh.keys(prompt) if lsh else ())


@dataclass(frozen=True)
class Verdict:
    """``kind``: None (new), "exact", "label_conflict" or "near"; ``other``: the earlier record's id."""

    kind: str | None
    other: int | None = None
    token: tuple | None = None  # pass to ``add`` to keep a new record


class Deduplicator:
    """Remembers kept records; says whether a new one repeats, contradicts or nearly repeats one.

    Exact duplicates are judged on the whole record; conflicts and near-duplicates on the prompt (all
    turns but the answer) together with the answer.
    """

    def __init__(self, near: bool = True, threshold: float = 0.85, num_perm: int = 64, shingle: int = 3,
                 conflicts: bool = True) -> None:
        self.near = near
        self.detect_conflicts = conflicts
        self.threshold = threshold
        self.exact = IntSet()
        self.prompts = IntMap()
        self.answers = _Column()
        self.lsh = LshKeys(num_perm, shingle, threshold)
        self.hasher, self.bands, self.rows = self.lsh.hasher, self.lsh.bands, self.lsh.rows
        self.band_maps = [IntMap(key_bits=32, max_load=0.75) for _ in range(self.bands)] if near else []
        self.store = PromptStore() if near else None
        self.verified_pairs = 0  # candidates checked against the stored prompt
        self.conflicts: set[int] = set()  # prompt digests seen with different answers (rare)

    def __len__(self) -> int:
        return self.answers.size

    def _near(self, prompt: str, bands: list[int], answer: int | None) -> int | None:
        """The id of a kept record this one nearly duplicates (verified), or None."""
        candidates = dict.fromkeys(other for key, band in zip(bands, self.band_maps) for other in band.get_all(key))
        grams = None
        for other in candidates:
            self.verified_pairs += 1
            if answer is not None and int(self.answers.data[other]) != answer:
                continue
            grams = shingles(prompt, self.hasher.shingle) if grams is None else grams
            text = self.store.get(other)
            if jaccard(grams, shingles(text, self.hasher.shingle)) >= self.threshold and same_values(prompt, text):
                return other
        return None

    def check(self, record: str, prompt: str, answer: str) -> Verdict:
        """``answer`` is the canonical answer (the task's ``answer_key``), ``record`` includes it."""
        return self.check_keys(prompt, Keys.of(record, prompt, answer, self.lsh if self.near else None))

    def check_keys(self, prompt: str, keys: Keys) -> Verdict:
        """``check`` on keys computed earlier (``Keys.of`` with an ``LshKeys`` of the same settings)."""
        key, pkey, akey, bands = keys
        if pkey in self.conflicts:  # every record with a contested prompt joins the conflict
            return Verdict("label_conflict", self.prompts.get(pkey))
        if key in self.exact:
            return Verdict("exact")
        other = self.prompts.get(pkey) if self.detect_conflicts else None
        if other is not None:
            if int(self.answers.data[other]) == akey:  # the same answer in other words: a repeat
                return Verdict("exact", other)
            self.conflicts.add(pkey)
            return Verdict("label_conflict", other)
        bands = list(bands) if self.near else []
        if self.near:
            other = self._near(prompt, bands, akey)
            if other is not None:
                return Verdict("near", other)
        return Verdict(None, None, (key, pkey, akey, bands, prompt))

    def add(self, token: tuple) -> int:
        """Keep the record ``check`` returned ``token`` for; returns its id."""
        key, pkey, akey, bands, prompt = token
        rid = self.answers.size
        self.exact.add(key)
        self.prompts.setdefault(pkey, rid)
        self.answers.append(akey)
        for k, band in zip(bands, self.band_maps):
            band.add(k, rid, BUCKET_CAP)
        if self.store is not None:
            self.store.append(prompt)
        return rid

    def contains(self, prompt: str, answer: str, bands: tuple[int, ...] | None = None) -> bool:
        """Whether a prompt equals, or (verified) nearly duplicates, a kept record's: contamination.
        ``bands``: the prompt's LSH keys when already computed with the same settings."""
        if self.prompts.get(digest64(prompt)) is not None:
            return True
        if not self.near:
            return False
        bands = self.lsh.keys(prompt) if not bands else bands
        return self._near(prompt, list(bands), digest64(answer)) is not None

    @property
    def nbytes(self) -> int:
        return (self.exact.nbytes + self.prompts.nbytes + self.answers.data.nbytes
                + sum(m.nbytes for m in self.band_maps)
                + (self.store._ends.data.nbytes if self.store else 0))

