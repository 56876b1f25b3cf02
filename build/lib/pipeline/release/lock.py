"""One retrain at a time per model: an exclusive ``flock`` on a file, held for the whole run.

A cron retrain and a drift-triggered retrain of the same model must not both run DVC, gate against the
same champion and both register. The kernel releases a ``flock`` when its process dies, so a crashed run
never leaves a stale lock behind. Across machines (one MLflow, several workers) the flow adds a Prefect
global concurrency limit on top (flows/retrain.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK_DIR = Path(".loraflow/locks")


class LockTimeout(TimeoutError):
    pass


@contextlib.contextmanager
def retrain_lock(model: str, timeout_s: float = 6 * 3600, lock_dir: Path = LOCK_DIR,
                 say: Callable[[str], None] = print, poll_s: float = 0.5) -> Iterator[Path]:
    """Hold the retrain lock of ``model``; waits (reporting who holds it) up to ``timeout_s``."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"retrain-{model}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        started = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                if waited > timeout_s:
                    raise LockTimeout(f"another retrain of {model} still holds {path} after {timeout_s:.0f}s "
                                      f"({_holder(path)})") from None
                if not told:
                    say(f"another retrain of {model} is running ({_holder(path)}); waiting for it to finish")
                    told = True
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode())
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"pid {info.get('pid')} since {info.get('since')}"
    except (OSError, ValueError):
        return "holder unknown"
