"""The request log: every request, PII-redacted off the request path, rotated by size and age, with
retention on a timer."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pipeline.io import ends_torn, rotated_files
from pipeline.pii import Redactor, build_redactor


class RequestLog:
    """Append-only JSONL of every request, PII-redacted before it is written, rotated by size and age.

    The live file is ``path``; a full one, or one older than ``rotate_hours``, is renamed
    ``<stem>.<UTC time>.jsonl``, and rotated files whose newest record is older than ``retention_days`` are
    deleted. Retention runs on a timer (every ``check_s``), so at low traffic no record outlives
    retention + rotate_hours. Raw text is only ever in memory.
    """

    def __init__(self, path: Path, max_bytes: int, retention_days: float, redactor: Redactor | None = None,
                 rotate_hours: float = 24.0, check_s: float = 60.0,
                 text_fields: tuple[str, ...] = ("prompt", "response"), max_queue: int = 10_000):
        """``redactor``: the sanitizer's (``build_redactor(p.sanitize)``, custom patterns included), so the
        log keeps nothing that training data would not. ``text_fields``: the free-text fields redacted where
        present (a ``messages`` list has each message's content redacted too; an absent field stays absent);
        the feedback log names its own. ``max_queue``: records waiting for the writer thread; beyond it a
        record is dropped and counted (``dropped``), so a stalled disk cannot grow serving's memory without
        bound. ``append`` (the feedback path) never drops: it writes in the caller's thread and raises."""
        self.text_fields = text_fields
        self.path, self.max_bytes, self.retention = path, max_bytes, timedelta(days=retention_days)
        self.rotate_after_s = rotate_hours * 3600
        self._redactor = redactor or build_redactor()
        self._lock = threading.Lock()
        # Redaction and disk writes happen on a writer thread, off the request path.
        self._queue: queue.Queue[dict] = queue.Queue(maxsize=max_queue)
        self.dropped = 0  # records refused by a full queue
        self.failed = 0  # records the writer could not write (disk full, read-only)
        self._tail_checked = False
        threading.Thread(target=self._drain, daemon=True, name="loraflow-request-log").start()
        self._stop = threading.Event()
        threading.Thread(target=self._timer, args=(check_s,), daemon=True, name="loraflow-log-retention").start()

    def _timer(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.enforce_retention()
            except OSError as e:  # a full or read-only disk must not kill serving; say so
                print(f"warning: request log {self.path}: retention: {e}", flush=True)

    def enforce_retention(self, now: float | None = None) -> None:
        """Rotate the live file once it is older than ``rotate_hours``, delete rotated files past retention."""
        now = time.time() if now is None else now
        with self._lock:
            started = self._started()
            if started is not None and now - started > self.rotate_after_s:
                self._rotate()
            self._expire(now)

    def _started(self) -> float | None:
        """When the live file's first record was written (its first line's ``ts``), or None."""
        try:
            with open(self.path, encoding="utf-8") as fh:
                first = fh.readline()
            return datetime.fromisoformat(json.loads(first)["ts"]).timestamp()
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _rotate(self) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        self.path.rename(self.path.with_name(f"{self.path.stem}.{stamp}{self.path.suffix}"))

    def close(self) -> None:
        self._stop.set()

    def redact(self, text: str) -> str:
        return self._redactor.redact(text)[0]

    def write(self, record: dict) -> None:
        """Queue ``record``; it is redacted and appended shortly after (``flush`` waits for that). A full
        queue drops it, counted in ``dropped`` and said (every 1,000th), never blocking the request."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                print(f"warning: request log {self.path}: writer behind, {self.dropped} record(s) dropped so far "
                      f"(queue of {self._queue.maxsize})", flush=True)

    def append(self, record: dict) -> None:
        """Redact and append ``record`` now, in the caller's thread: on disk when this returns, or an
        ``OSError`` (what a feedback acknowledged as stored needs: flushed to the disk, not the page cache)."""
        self._append(record, sync=True)

    def flush(self) -> None:
        self._queue.join()

    def _drain(self) -> None:
        while True:
            record = self._queue.get()
            try:
                self._append(record)
            except Exception as e:  # noqa: BLE001 - a full disk must not kill serving; count it and say so
                self.failed += 1
                print(f"warning: request log {self.path}: record not written ({self.failed} so far): {e}",
                      flush=True)
            finally:
                self._queue.task_done()

    def _append(self, record: dict, sync: bool = False) -> None:
        record = {**record, **{k: self.redact(str(record[k])) for k in self.text_fields if record.get(k) is not None}}
        if isinstance(record.get("messages"), list):
            record["messages"] = [{**m, "content": self.redact(str(m.get("content") or ""))}
                                  for m in record["messages"]]
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self._tail_checked:
                # A writer killed mid-line left a torn last line: rotate it away so it stays the last line of
                # its file (readers skip and count exactly that) instead of gluing it to our first record.
                if ends_torn(self.path):
                    self._rotate()
                self._tail_checked = True
            if self.path.exists() and self.path.stat().st_size + len(line) > self.max_bytes:
                self._rotate()
                self._expire()
            data = line.encode("utf-8")
            with open(self.path, "ab") as fh:
                start = fh.tell()
                try:
                    fh.write(data)
                    fh.flush()
                    if sync:
                        os.fsync(fh.fileno())
                except BaseException:
                    # Half a line must not stay for the next record to be glued onto (damage mid-file).
                    with contextlib.suppress(OSError):
                        fh.truncate(start)
                    raise

    def rotated(self) -> list[Path]:
        return rotated_files(self.path)

    def _expire(self, now: float | None = None) -> None:
        cutoff = (time.time() if now is None else now) - self.retention.total_seconds()
        for f in self.rotated():
            if f.stat().st_mtime < cutoff:
                f.unlink(missing_ok=True)
