"""Where sanitize's per-record work runs: in this process, or on a Dask cluster.

Parsing, validation, normalising for detection, redaction, the task check and the dedup keys (digests and
MinHash band keys) need only the record itself; they run wherever the engine puts them. Everything that
needs other records (exact and near duplicates, label conflicts, contamination, the validation carve) is
decided by ``sanitize_files`` in this process, over all records in input order. That is why the outputs
are the same record for record whatever the engine and however many workers: the engine only changes
where the pure part runs.

Dask (not Ray, docs/architecture.md says why): JSONL inputs are cut into byte-range shards at line starts
(``sanitize.cluster.shard_mb``), other formats are one shard a file. Each shard's prepared records come
back as one pickled block, consumed in shard order with at most two shards a worker in flight, so memory
stays bounded on both sides. A worker that dies is replaced and its shard re-run (``retries``); a shard
that does not finish within ``shard_timeout_s`` stops the stage with its name. The blocks carry redacted
text only: the raw line of a record stays on the worker, which re-reads it when a label-conflict entry
needs it (rare).
"""

from __future__ import annotations

import pickle
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from pipeline.config import SanitizeConfig
from pipeline.data.ingest import Shard, plan_shards, read_records, read_shard
from pipeline.data.sanitize import Prepared, Preparer, Shape
from pipeline.pii import Redactor
from pipeline.tasks import Task


class EngineError(RuntimeError):
    """The cluster could not be reached or a shard could not be prepared."""


class Engine(Protocol):
    def prepare(self, inputs: list[Path], cfg: SanitizeConfig, task: Task | None, shape: Shape, key: bytes,
                near: bool, progress: Callable[[str], None] | None) -> Iterator[Prepared]: ...

    def redacted_raws(self, items: list[Prepared], cfg: SanitizeConfig) -> list[str]: ...

    def describe(self) -> dict: ...


class LocalEngine:
    """Everything in this process, one record at a time (the default)."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        self.redactor = redactor
        self._preparer: Preparer | None = None

    def prepare(self, inputs, cfg, task, shape, key, near, progress) -> Iterator[Prepared]:
        self._preparer = prep = Preparer(cfg, task, shape, key, near, redactor=self.redactor)
        self.redactor = prep.redactor
        for path in inputs:
            for rec in read_records(Path(path), cfg.columns):
                yield prep(rec)

    def redacted_raws(self, items: list[Prepared], cfg: SanitizeConfig) -> list[str]:
        return [self._preparer.redacted_raw(item.raw) for item in items]

    def describe(self) -> dict:
        return {"name": "local", "workers": 1, "shards": 1}


# One preparer per worker process and settings: the redactor (patterns, name lists, an optional model) is
# built once, not once a shard.
_PREPARERS: dict[tuple, Preparer] = {}


def _preparer(cfg: SanitizeConfig, task: Task | None, shape: Shape, key: bytes, near: bool) -> Preparer:
    ident = (cfg.model_dump_json(), None if task is None else (task.kind, task.cfg.model_dump_json()), shape,
             key, near)
    if ident not in _PREPARERS:
        if len(_PREPARERS) > 4:
            _PREPARERS.clear()
        _PREPARERS[ident] = Preparer(cfg, task, shape, key, near, keep_raw=False)
    return _PREPARERS[ident]


def prepare_shard(shard: Shard, cfg: SanitizeConfig, task: Task | None, shape: Shape, key: bytes,
                  near: bool) -> tuple[bytes, int]:
    """Run on a worker: the shard's prepared records, in order, as one pickled block, and the worker
    process's peak RSS in KiB so far (what ``shard_mb`` bounds)."""
    import resource

    prep = _preparer(cfg, task, shape, key, near)
    block = pickle.dumps([prep(rec) for rec in read_shard(shard, cfg.columns)], protocol=pickle.HIGHEST_PROTOCOL)
    return block, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def redact_lines(shard: Shard, lines: list[int], cfg: SanitizeConfig) -> dict[int, str]:
    """Run on a worker: the redacted raw text of the given lines of a shard (label-conflict entries)."""
    wanted, prep = set(lines), _preparer(cfg, None, "chat", b"", False)
    return {rec.line: prep.redacted_raw(rec.raw) for rec in read_shard(shard, cfg.columns) if rec.line in wanted}


class DaskEngine:
    """Shards on a Dask cluster: the scheduler at ``sanitize.cluster.address``, or a local cluster."""

    def __init__(self, client, cfg: SanitizeConfig) -> None:
        self.client, self.cluster_cfg = client, cfg.cluster
        self._shards: list[Shard] = []
        self.shuffle_bytes = 0
        self.workers = 0
        self.waited_s = 0.0  # this process waiting for a shard: near the total when the workers bound the run
        self.worker_rss_kb = 0  # the largest worker's peak memory

    @classmethod
    @contextmanager
    def open(cls, cfg: SanitizeConfig) -> Iterator["DaskEngine"]:
        from distributed import Client, LocalCluster

        c = cfg.cluster
        cluster = None
        try:
            if c.address:
                client = Client(c.address, timeout=c.connect_timeout_s)
            else:
                # Bound to localhost with no dashboard: nothing listens beyond this machine.
                cluster = LocalCluster(n_workers=c.workers, threads_per_worker=1, processes=True,
                                       memory_limit=c.memory_limit, host="127.0.0.1", dashboard_address=None)
                client = Client(cluster, timeout=c.connect_timeout_s)
        except OSError as err:  # distributed raises OSError (TimeoutError included) when it cannot connect
            raise EngineError(f"sanitize.cluster.address: cannot reach the Dask scheduler at "
                              f"{c.address or 'the local cluster'} within {c.connect_timeout_s:g} s: {err}") from err
        try:
            yield cls(client, cfg)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()

    def prepare(self, inputs, cfg, task, shape, key, near, progress) -> Iterator[Prepared]:
        from distributed import wait

        self._shards = shards = plan_shards([Path(p) for p in inputs], int(cfg.cluster.shard_mb * 2**20))
        self.shuffle_bytes, self.waited_s, self.worker_rss_kb = 0, 0.0, 0
        self.workers = len(self.client.scheduler_info(n_workers=-1).get("workers", {})) or 1
        window = 2 * self.workers
        started, done_bytes = time.perf_counter(), 0
        futures: deque = deque()

        def submit(i: int):
            return self.client.submit(prepare_shard, shards[i], cfg, task, shape, key, near, pure=False,
                                      retries=cfg.cluster.retries, key=f"sanitize-shard-{i}-{time.time_ns()}")

        nxt = 0
        try:
            for i in range(len(shards)):
                while nxt < len(shards) and nxt < i + window:
                    futures.append(submit(nxt))
                    nxt += 1
                future = futures.popleft()
                waiting = time.perf_counter()
                try:
                    wait([future], timeout=cfg.cluster.shard_timeout_s)
                except TimeoutError:
                    futures.appendleft(future)
                    raise EngineError(f"sanitize: shard {i} ({_name(shards[i])}) did not finish within "
                                      f"sanitize.cluster.shard_timeout_s = {cfg.cluster.shard_timeout_s:g} s") from None
                self.waited_s += time.perf_counter() - waiting
                try:
                    block, rss_kb = future.result()
                except Exception as err:  # the worker's own error, re-raised after the retries
                    raise EngineError(f"sanitize: shard {i} ({_name(shards[i])}) failed: {err}") from err
                future.release()
                self.shuffle_bytes += len(block)
                self.worker_rss_kb = max(self.worker_rss_kb, rss_kb)
                items: list[Prepared] = pickle.loads(block)
                del block
                for item in items:
                    item.shard = i
                done_bytes += sum(item.nbytes for item in items)
                if progress:
                    mb = done_bytes / 1e6
                    progress(f"sanitize: shard {i + 1}/{len(shards)} ({_name(shards[i])}), {mb:,.1f} MB, "
                             f"{mb / (time.perf_counter() - started):.1f} MB/s on {self.workers} workers")
                yield from items
        finally:  # stopped early (an error, a timeout): nothing keeps running on the cluster for it
            if futures:
                self.client.cancel(list(futures))

    def redacted_raws(self, items: list[Prepared], cfg: SanitizeConfig) -> list[str]:
        by_shard: dict[int, list[int]] = defaultdict(list)
        for item in items:
            by_shard[item.shard].append(item.line)
        futures = {i: self.client.submit(redact_lines, self._shards[i], lines, cfg, pure=False,
                                         retries=cfg.cluster.retries) for i, lines in by_shard.items()}
        texts = {i: f.result(timeout=cfg.cluster.shard_timeout_s) for i, f in futures.items()}
        return [texts[item.shard][item.line] for item in items]

    def describe(self) -> dict:
        return {"name": "dask", "address": self.cluster_cfg.address or "local cluster", "workers": self.workers,
                "shards": len(self._shards), "shuffle_bytes": self.shuffle_bytes,
                "waited_s": round(self.waited_s, 3), "worker_peak_rss_mb": round(self.worker_rss_kb / 1024, 1)}


def _name(shard: Shard) -> str:
    if shard.end is None and not shard.start:
        return shard.path
    return f"{shard.path} from line {shard.first_line}"


@contextmanager
def open_engine(cfg: SanitizeConfig) -> Iterator[Engine | None]:
    """The engine ``sanitize.engine`` names, open for the whole stage (None: the local default)."""
    if cfg.engine == "dask":
        with DaskEngine.open(cfg) as engine:
            yield engine
    else:
        yield None
