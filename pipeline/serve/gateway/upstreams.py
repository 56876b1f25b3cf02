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
# as with one pool of httpx's default 100). A request takes the pool with the fewest in flight, so a small
# pool never queues while another has room. Measured paired on CPU (bench/gateway_profile.py --compare,
# 2026-12-03, both fewest-first): 32 x 4 vs 8 x 16 took the gateway's CPU a request to 0.96/0.77/0.76x at
# 16/64/128 clients (docs/benchmarks.md).
POOL_SHARDS, POOL_CONNECTIONS = 32, 4


class Upstreams:
    def __init__(self, urls: list[str], key: str, timeout_s: float, cooldown_s: float = 5.0) -> None:
        if not urls:
            raise ValueError("the gateway needs at least one vLLM URL")
        self.urls, self.key, self.timeout_s, self.cooldown_s = list(urls), key, timeout_s, cooldown_s
        self.in_flight = [0] * len(self.urls)
        self.pool_in_flight = [0] * (len(self.urls) * POOL_SHARDS)
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

    def take(self, i: int) -> int:
        """Count a request to replica ``i``; returns its pool (for ``client`` and ``done``): the one of the
        replica's pools with the fewest requests in flight, the next in turn among equals."""
        first, start = i * POOL_SHARDS, next(self._turn) % POOL_SHARDS
        with self._lock:
            self.in_flight[i] += 1
            self.served[i] += 1
            pool = min((first + (start + k) % POOL_SHARDS for k in range(POOL_SHARDS)),
                       key=self.pool_in_flight.__getitem__)
            self.pool_in_flight[pool] += 1
        return pool

    def done(self, pool: int) -> None:
        with self._lock:
            self.in_flight[pool // POOL_SHARDS] -= 1
            self.pool_in_flight[pool] -= 1

    def refused(self, i: int) -> None:
        with self._lock:
            self.down_until[i] = time.monotonic() + self.cooldown_s

    def client(self, pool: int) -> httpx.AsyncClient:
        """The connection pool ``take`` chose. Small pools, because httpcore's pool re-checks every one of
        its connections (a poll syscall each, and a quadratic idle count) whenever a request comes or goes:
        one pool of 100 connections cost the gateway 5.6 ms of CPU a request at 64 clients
        (bench/gateway_profile.py), and it fell to 0.85x of direct vLLM at 128 clients on an H200."""
        if pool not in self._clients:
            self._clients[pool] = httpx.AsyncClient(
                base_url=self.urls[pool // POOL_SHARDS], timeout=self.timeout_s,
                headers={"Authorization": f"Bearer {self.key}"},
                limits=httpx.Limits(max_connections=POOL_CONNECTIONS, max_keepalive_connections=POOL_CONNECTIONS))
        return self._clients[pool]

    def status(self) -> list[dict]:
        now = time.monotonic()
        return [{"url": u, "in_flight": self.in_flight[i], "requests": self.served[i],
                 "cooling_down": self.down_until[i] > now} for i, u in enumerate(self.urls)]

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.aclose()
        self._clients.clear()
