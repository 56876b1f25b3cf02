"""What a vLLM process's log says about why it stopped, for the two places that start one (the evaluate
stage's offline engine, the serving endpoint): the root cause, and whether it was a transient start-up
failure worth another start."""

from __future__ import annotations

import re
from pathlib import Path

# vLLM's engine core fails in a process of its own; the parent's last lines only say "see root cause above".
_GENERIC = ("Engine core initialization failed", "Traceback")

# Start-up failures that say nothing about this start: vLLM sizes its KV cache from the GPU's memory before
# and after a profiling pass, and counts what other processes did meanwhile as its own. Another process that
# released memory stops it ("Error in memory profiling"); one that took memory (on the H200, 2026-12-03: the
# demo's serving vLLM allocating its KV cache while the evaluate engine profiled) leaves it none for its
# cache. The next start, a little later, does not depend on what happened during this one. The second
# message is also what a gpu_memory_utilization too small for the model says, every time: the attempts are
# bounded, and the last one's error carries vLLM's advice to raise it.
TRANSIENT_START = ("Error in memory profiling", "No available memory for the cache blocks")
START_ATTEMPTS = 3


def root_cause(log: Path, offset: int = 0) -> str:
    """The last error line of the run's own output (from byte ``offset``: a log can hold several runs) that
    is not vLLM's generic wrapper (e.g. the engine's 'Free memory on device ... is less than desired GPU
    memory utilization'), as ': <line>'; "" when there is none or the log cannot be read."""
    try:
        with open(log, "rb") as fh:
            fh.seek(offset)
            lines = fh.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    found = [ln.strip() for ln in lines
             if re.search(r"(Error|Exception)\b.*:", ln) and not any(g in ln for g in _GENERIC)]
    return f": {found[-1][:400]}" if found else ""


def transient_start(cause: str) -> bool:
    """Whether a root cause is one of vLLM's transient start-up failures."""
    return any(m in cause for m in TRANSIENT_START)


def log_size(log: Path) -> int:
    """Where the next run's output will start in an appended log."""
    try:
        return log.stat().st_size
    except FileNotFoundError:
        return 0
