"""The routing table: stable model name -> the adapter vLLM serves for it, swapped atomically, with
requests in flight counted per adapter (an old adapter is unloaded once they finished)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from pipeline.config import TaskConfig


@dataclass(frozen=True)
class Route:
    name: str        # what clients send
    internal: str    # the adapter name inside vLLM (fresh for every load)
    version: int
    task: TaskConfig


class Routes:
    """Stable name -> the route serving it; swaps are atomic, in-flight requests are counted per adapter."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._routes: dict[str, Route] = {}
        self._inflight: dict[str, int] = {}

    def get(self, name: str) -> Route | None:
        with self._lock:
            return self._routes.get(name)

    def all(self) -> list[Route]:
        with self._lock:
            return sorted(self._routes.values(), key=lambda r: r.name)

    def clear(self) -> None:
        """Forget every route (the vLLM behind them restarts); in-flight counts drain on their own."""
        with self._lock:
            self._routes.clear()

    def set(self, route: Route) -> Route | None:
        with self._lock:
            previous = self._routes.get(route.name)
            self._routes[route.name] = route
            return previous

    def acquire(self, name: str) -> Route | None:
        with self._lock:
            route = self._routes.get(name)
            if route is not None:
                self._inflight[route.internal] = self._inflight.get(route.internal, 0) + 1
            return route

    def release(self, route: Route) -> None:
        with self._lock:
            self._inflight[route.internal] -= 1

    def in_flight(self) -> int:
        with self._lock:
            return sum(self._inflight.values())

    def wait_drained(self, internal: str, timeout_s: float = 300) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._inflight.get(internal):
                    self._inflight.pop(internal, None)
                    return True
            time.sleep(0.05)
        return False
