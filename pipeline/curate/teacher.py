"""A teacher labels requests nobody corrected: any OpenAI-compatible endpoint (a bigger model, a hosted API,
a local vLLM), asked with the task's generation settings; the task's parser decides what is usable.

Each answer is cached under (prompt hash, teacher model, teacher version) in ``teacher.cache_dir`` (outside
the DVC outputs), so a re-run, or another cut that meets the same prompt, costs no call. Calls go out in
batches of ``batch_size``, at most ``concurrency`` at once and ``requests_per_s`` in all; timeouts,
connection errors, 429 and 5xx are retried with doubling waits, and a teacher still unreachable after that
stops the stage (``TeacherUnavailable``: transient, nothing is consumed) rather than reading as "no label".
A 4xx other than 429 is the teacher refusing that one prompt: it is skipped with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pipeline.config import TaskConfig, TeacherConfig

TRANSIENT_STATUS = (408, 409, 425, 429, 500, 502, 503, 504)


class TeacherUnavailable(RuntimeError):
    """The teacher did not answer after every retry (transient: run curate again later)."""


@dataclass
class Label:
    answer: str | None  # None: the teacher refused this prompt (``error`` says why)
    cached: bool = False
    error: str = ""


@dataclass
class TeacherStats:
    asked: int = 0  # prompts labelled this run
    cache_hits: int = 0
    calls: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    refused: int = 0
    seconds: float = 0.0
    over_cap: int = 0
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"asked": self.asked, "cache_hits": self.cache_hits, "calls": self.calls, "retries": self.retries,
                "refused": self.refused, "over_cap": self.over_cap, "seconds": round(self.seconds, 3),
                "labelled_per_s": round((self.asked - self.cache_hits) / self.seconds, 3) if self.seconds else None,
                "errors": self.errors[:5]}


def prompt_hash(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


class _Pace:
    """At most ``rate`` calls per second across threads (evenly spaced)."""

    def __init__(self, rate: float) -> None:
        self.gap, self.next, self.lock = 1.0 / rate, 0.0, threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            at = max(now, self.next)
            self.next = at + self.gap
        if at > now:
            time.sleep(at - now)


class Teacher:
    def __init__(self, cfg: TeacherConfig, task: TaskConfig, say=print):
        self.cfg, self.task, self.say = cfg, task, say
        key = os.environ.get(cfg.api_key_env, "")
        self.client = httpx.Client(base_url=cfg.url, timeout=cfg.timeout_s,
                                   headers={"Authorization": f"Bearer {key}"} if key else {})
        self.pace = _Pace(cfg.requests_per_s)
        self.stats = TeacherStats()
        self.version = cfg.version or self._served_version()
        tag = hashlib.sha256(f"{cfg.model}\x1f{self.version}".encode()).hexdigest()[:16]
        self.cache_file = Path(cfg.cache_dir) / f"{tag}.jsonl"
        self.cache = self._read_cache()

    @property
    def name(self) -> dict:
        return {"model": self.cfg.model, "version": self.version, "url": self.cfg.url}

    def _send(self, method: str, path: str, **kw) -> httpx.Response:
        """One request with retries on transient failures; the response of a definite answer."""
        wait = self.cfg.retry_backoff_s
        last = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                self.stats.retries += 1
                time.sleep(wait)
                wait *= 2
            self.pace.wait()
            self.stats.calls += 1
            try:
                resp = self.client.request(method, path, **kw)
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if resp.status_code in TRANSIENT_STATUS:
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            return resp
        raise TeacherUnavailable(f"teacher {self.cfg.model} at {self.cfg.url}: no answer after "
                                 f"{self.cfg.retries + 1} attempts ({last}); nothing was consumed, run curate again")

    def _served_version(self) -> str:
        """What the endpoint says it serves under the model name (vLLM: the weights' path as ``root``)."""
        resp = self._send("GET", "/models")
        if resp.status_code != 200:
            raise TeacherUnavailable(f"teacher at {self.cfg.url}: GET /models answered {resp.status_code}: "
                                     f"{resp.text[:200]}")
        for m in resp.json().get("data", []):
            if m.get("id") == self.cfg.model:
                return str(m.get("root") or m["id"])
        names = [m.get("id") for m in resp.json().get("data", [])]
        raise TeacherUnavailable(f"teacher at {self.cfg.url} does not serve {self.cfg.model!r} (it serves {names})")

    def _read_cache(self) -> dict[str, str]:
        cache: dict[str, str] = {}
        if self.cache_file.is_file():
            with open(self.cache_file, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        entry = json.loads(line)
                        cache[entry["key"]] = entry["answer"]
                    except (json.JSONDecodeError, KeyError):  # a torn last line of a killed run
                        continue
        return cache

    def _ask(self, messages: list[dict]) -> Label:
        body = {"model": self.cfg.model, "messages": messages, **self.task.generation_defaults()}
        resp = self._send("POST", "/chat/completions", json=body)
        if resp.status_code != 200:
            return Label(None, error=f"HTTP {resp.status_code}: {resp.text[:200]}")
        try:
            return Label(resp.json()["choices"][0]["message"]["content"] or "")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            return Label(None, error=f"answer not understood ({type(e).__name__})")

    def label(self, conversations: list[list[dict]], cap: int | None = None) -> list[Label | None]:
        """A label per conversation; None for those beyond ``cap`` calls this run (left for the next run)."""
        cap = self.cfg.max_per_run if cap is None else cap
        started = time.perf_counter()
        out: list[Label | None] = [None] * len(conversations)
        todo: list[int] = []
        for i, msgs in enumerate(conversations):
            hit = self.cache.get(prompt_hash(msgs))
            if hit is not None:
                out[i] = Label(hit, cached=True)
                self.stats.cache_hits += 1
            elif len(todo) < cap:
                todo.append(i)
            else:
                self.stats.over_cap += 1
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            for start in range(0, len(todo), self.cfg.batch_size):
                batch = todo[start:start + self.cfg.batch_size]
                labels = list(pool.map(lambda i: self._ask(conversations[i]), batch))
                with open(self.cache_file, "a", encoding="utf-8") as fh:  # a killed run keeps finished batches
                    for i, lab in zip(batch, labels):
                        out[i] = lab
                        if lab.answer is None:
                            self.stats.refused += 1
                            self.stats.errors.append(lab.error)
                            continue
                        key = prompt_hash(conversations[i])
                        self.cache[key] = lab.answer
                        fh.write(json.dumps({"key": key, "answer": lab.answer}, ensure_ascii=False) + "\n")
                self.say(f"curate: teacher labelled {min(start + len(batch), len(todo))}/{len(todo)}")
        self.stats.asked += sum(x is not None for x in out)
        self.stats.seconds += time.perf_counter() - started
        return out

    def close(self) -> None:
        self.client.close()
