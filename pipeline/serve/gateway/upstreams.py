"""The vLLM replicas behind the gateway: which one takes the next request.

Fewest requests in flight first, round robin among equals, so a slow replica gets less. A replica that
refused the connection is skipped for ``cooldown_s`` (the request goes to the next one: nothing was sent,
so it cannot be answered twice); when every replica is cooling down they are tried anyway, in order.
"""

from __future__ import annotations

import itertools
import threading
import time

import httpx

# Connections to each replica: POOL_SHARDS pools of POOL_CONNECTIONS (128 in flight before requests queue,
# as with one pool of httpx's default 100).
POOL_SHARDS, POOL_CONNECTIONS = 8, 16


class Upstreams:
    def __init__(self, urls: list[str], key: str, timeout_s: float, cooldown_s: float = 5.0) -> None:
        if not urls:
            raise ValueError("the gateway needs at least one vLLM URL")
        self.urls, self.key, self.timeout_s, self.cooldown_s = list(urls), key, timeout_s, cooldown_s
        self.in_flight = [0] * len(self.urls)
        self.down_until = [0.0] * len(self.urls)
        self.served = [0] * len(self.urls)
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._clients: dict[int, httpx.AsyncClient] = {}

    def order(self) -> list[int]:
        """Replicas in the order to try them for one request."""
        now, turn = time.monotonic(), next(self._turn)
        n = len(self.urls)
        with self._lock:
            return sorted(range(n), key=lambda i: (self.down_until[i] > now, self.in_flight[i], (i - turn) % n))

    def take(self, i: int) -> None:
        with self._lock:
            self.in_flight[i] += 1
            self.served[i] += 1

    def done(self, i: int) -> None:
        with self._lock:
            self.in_flight[i] -= 1

    def refused(self, i: int) -> None:
        with self._lock:
            self.down_until[i] = time.monotonic() + self.cooldown_s

    def client(self, i: int) -> httpx.AsyncClient:
        """One of replica ``i``'s small connection pools, in turn. httpcore's pool re-checks every one of
        its connections (a poll syscall each, and a quadratic idle count) whenever a request comes or
        goes: one pool of 100 connections cost the gateway 5.6 ms of CPU a request at 64 clients
        (bench/gateway_profile.py), and it fell to 0.85x of direct vLLM at 128 clients on an H200."""
        shard = next(self._turn) % POOL_SHARDS
        key = i * POOL_SHARDS + shard
        if key not in self._clients:
            self._clients[key] = httpx.AsyncClient(
                base_url=self.urls[i], timeout=self.timeout_s, headers={"Authorization": f"Bearer {self.key}"},
                limits=httpx.Limits(max_connections=POOL_CONNECTIONS, max_keepalive_connections=POOL_CONNECTIONS))
        return self._clients[key]

    def status(self) -> list[dict]:
        now = time.monotonic()
        return [{"url": u, "in_flight": self.in_flight[i], "requests": self.served[i],
                 "cooling_down": self.down_until[i] > now} for i, u in enumerate(self.urls)]

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.aclose()
        self._clients.clear()
