"""Who may call the gateway and how much: client keys and per-key limits (rate, requests in flight)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from pipeline.config import LimitsConfig

KEYS_ENV = "LORAFLOW_API_KEYS"


def env_keys() -> list[str]:
    """Client keys in ``LORAFLOW_API_KEYS`` (comma-separated), in order."""
    return [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]


def load_keys(key_file: str = "") -> set[str]:
    """Client keys from ``LORAFLOW_API_KEYS`` or a key file (one per line)."""
    keys = set(env_keys())
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise ValueError(f"serve.gateway_key_file: {key_file} does not exist")
        keys |= {line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}
    if not keys:
        raise ValueError(f"no client API keys: set {KEYS_ENV} (comma-separated) or serve.gateway_key_file; "
                         "the gateway never runs unauthenticated")
    return keys


def key_id(key: str) -> str:
    """A short, non-reversible name of a client key: logged with each request so feedback is accepted only
    from the key that got the answer (the key itself is never written)."""
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()[:16]


class KeyLimiter:
    """Per client key: a token bucket (``requests_per_s`` sustained, ``burst`` at once) and a cap on requests
    in flight, so one client cannot starve the others. ``admit`` says how long to wait (0: go ahead)."""

    def __init__(self, limits: LimitsConfig) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key digest -> (tokens, last refill time)
        self._inflight: dict[str, int] = {}

    def admit(self, key: str) -> tuple[float, str]:
        """(seconds to wait before retrying, why) when refused; (0, "") when admitted (then ``done`` later)."""
        now = time.monotonic()
        with self._lock:
            if self._inflight.get(key, 0) >= self.limits.max_concurrent:
                return 1.0, f"more than {self.limits.max_concurrent} requests in flight for this key"
            tokens, last = self._buckets.get(key, (float(self.limits.burst), now))
            tokens = min(float(self.limits.burst), tokens + (now - last) * self.limits.requests_per_s)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return (1.0 - tokens) / self.limits.requests_per_s, (
                    f"rate limit: {self.limits.requests_per_s:g} requests/s per key (burst {self.limits.burst})")
            self._buckets[key] = (tokens - 1.0, now)
            self._inflight[key] = self._inflight.get(key, 0) + 1
            return 0.0, ""

    def done(self, key: str) -> None:
        with self._lock:
            left = self._inflight.get(key, 0) - 1
            if left > 0:
                self._inflight[key] = left
            else:
                self._inflight.pop(key, None)

    def in_flight(self) -> int:
        with self._lock:
            return sum(self._inflight.values())
