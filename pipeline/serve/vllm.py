"""vLLM serving: start/stop the OpenAI-compatible server, hot-swap LoRA adapters, send requests.

vLLM runs as its own process from its own environment (``serve.python``) because its pins conflict
with Prefect's; everything here talks HTTP to it. Adapters are loaded at run time through
``POST /v1/load_lora_adapter`` (needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true``), so following the
registry alias never restarts the server. vLLM listens on 127.0.0.1 with a key only the gateway holds;
clients reach it through the gateway (pipeline/serve/gateway.py), which logs their traffic.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pipeline.config import ServeConfig, TaskConfig
from pipeline.io import tail
from pipeline.modeling import BaseMissing, resolve_base
from pipeline.vllm_logs import START_ATTEMPTS, log_size, root_cause, transient_start


class ServingError(RuntimeError):
    """vLLM failed a request. ``transient``: it could not answer now (a timeout, a reset, 429/502/503/504:
    retry and keep serving what is served); else it refused this request (a 4xx, or the 500 vLLM answers
    when the engine rejects an adapter: its rank or shape)."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


# vLLM answers a failed adapter load with 500 whatever the cause (LoRA rank above max_lora_rank included):
# only these statuses mean "not now".
TRANSIENT_STATUS = frozenset({429, 502, 503, 504})


def _post(url: str, what: str, timeout: float, **kw) -> httpx.Response:
    """A POST to vLLM whose failure says whether it was transient."""
    try:
        r = httpx.post(url, timeout=timeout, **kw)
    except httpx.TransportError as err:  # connect, read, timeout, reset
        raise ServingError(f"{what}: {type(err).__name__}: {err}", transient=True) from None
    if r.status_code != 200:
        raise ServingError(f"{what} failed: HTTP {r.status_code}: {r.text[:500]}",
                           transient=r.status_code in TRANSIENT_STATUS)
    return r


def launch_command(cfg: ServeConfig, base_dir: Path) -> list[str]:
    """The vLLM command line; deploy/ and docker-compose.yml pass the same flags."""
    return [
        cfg.python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(base_dir),
        "--served-model-name", "base",
        "--enable-lora",
        "--max-lora-rank", str(cfg.max_lora_rank),
        "--max-loras", str(cfg.max_loras),
        "--max-model-len", str(cfg.max_model_len),
        "--dtype", cfg.dtype,
        "--host", cfg.host,
        "--port", str(cfg.port),
        *(["--tensor-parallel-size", str(cfg.tensor_parallel)] if cfg.tensor_parallel > 1 else []),
        *cfg.extra_args,
    ]


def replica_config(cfg: ServeConfig, i: int) -> ServeConfig:
    """Replica ``i`` of ``serve.replicas``: the next port, its own log and, unless ``serve.env`` pins them,
    its own ``tensor_parallel`` GPUs and its own share of the CPU cores. vLLM's CPU build binds its compute
    threads to cores by itself ("auto"), and two replicas both bind the same ones: one starved the other
    until vLLM's 300 s step deadline killed its engine. Each build ignores the other's variable."""
    if cfg.replicas == 1:
        return cfg
    log = Path(cfg.log_file)
    env = dict(cfg.env)
    if "CUDA_VISIBLE_DEVICES" not in env:
        tp = cfg.tensor_parallel
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(i * tp, (i + 1) * tp))
    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) // cfg.replicas
    if "VLLM_CPU_OMP_THREADS_BIND" not in env and share >= cfg.tensor_parallel:
        mine = cores[i * share:(i + 1) * share]
        # One list per tensor-parallel rank, "|"-separated (vLLM's format).
        tp = cfg.tensor_parallel
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, mine[r::tp])) for r in range(tp))
    return cfg.model_copy(update={"port": cfg.port + i, "env": env, "replicas": 1,
                                  "log_file": str(log.with_name(f"{log.stem}-{i}{log.suffix}"))})


@dataclass
class VLLMServer:
    """A vLLM server process owned by loraflow (``start``) or one already running (``attach``)."""

    cfg: ServeConfig
    process: subprocess.Popen | None = None
    _log: object = None  # the log file handle the process writes to, closed on stop
    # vLLM's own key (VLLM_API_KEY): only the gateway and loraflow hold it; never in a repr (logs)
    api_key: str = field(default="", repr=False)
    # (command, environment with the key): to start it again after a transient failure
    _launch: tuple | None = field(default=None, repr=False)
    _log_offset: int = 0  # where this start's output begins in the (appended) log
    starts: int = 1

    @property
    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def url(self) -> str:
        return self.cfg.base_url

    @classmethod
    def start(cls, cfg: ServeConfig, base_dir: Path, api_key: str = "") -> "VLLMServer":
        python = Path(cfg.python)
        if not python.exists():
            raise ServingError(
                f"serve.python: {cfg.python} not found; create the vLLM environment with `make vllm-env` "
                "(see shared notes in docs/architecture.md) or point serve.url at a running server")
        try:
            base_dir = resolve_base(base_dir)  # a pretrained base is referenced where it lives
        except BaseMissing as err:
            raise ServingError(str(err)) from None
        log = Path(cfg.log_file)
        log.parent.mkdir(parents=True, exist_ok=True)
        env = cfg.process_env(VLLM_ALLOW_RUNTIME_LORA_UPDATING="true")
        if api_key:  # through the environment, not argv: the command line is visible to every local user
            env["VLLM_API_KEY"] = api_key
        fh = open(log, "ab")
        launch = (launch_command(cfg, base_dir), env)
        offset = log_size(log)
        return cls(cfg, cls._spawn(launch, fh), fh, api_key, launch, offset)

    @staticmethod
    def _spawn(launch: tuple, fh) -> subprocess.Popen:
        cmd, env = launch
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    @classmethod
    def attach(cls, cfg: ServeConfig, api_key: str = "") -> "VLLMServer":
        return cls(cfg, None, None, api_key)

    @property
    def owned(self) -> bool:
        return self.process is not None

    def poll(self) -> int | None:
        """The exit code of the process this object started, None while it runs (or when attached)."""
        return self.process.poll() if self.process is not None else None

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float | None = None, progress=None) -> float:
        """Block until /health answers; returns seconds waited. Fails fast if the process dies."""
        timeout_s = timeout_s or self.cfg.startup_timeout_s
        begun = started = time.monotonic()
        last_note = 0.0
        while True:
            if self.healthy():
                return time.monotonic() - begun
            if self.process is not None and self.process.poll() is not None:
                log = Path(self.cfg.log_file)
                cause = root_cause(log, self._log_offset)
                if transient_start(cause) and self.starts < START_ATTEMPTS and self._launch is not None:
                    # Not this server's fault (another process on the GPU): start it again, with a new deadline.
                    self.starts += 1
                    if progress:
                        progress(f"vLLM's start was disturbed{cause}; start {self.starts} of {START_ATTEMPTS}")
                    self.stop()
                    self._log = open(log, "ab")
                    self._log_offset = log_size(log)
                    self.process = self._spawn(self._launch, self._log)
                    started, last_note = time.monotonic(), 0.0
                    continue
                raise ServingError(f"vLLM exited with code {self.process.returncode} during start-up{cause}; "
                                   f"last lines of {self.cfg.log_file}:\n{tail(log)}")
            waited = time.monotonic() - started
            if waited > timeout_s:
                raise ServingError(f"vLLM not ready after {timeout_s:.0f}s; see {self.cfg.log_file}")
            if progress and waited - last_note >= 15:
                progress(f"waiting for vLLM at {self.url} ({waited:.0f}s)")
                last_note = waited
            time.sleep(1)

    def stop(self, timeout_s: float = 30) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.process is not None:
            # vLLM's engine processes outlive an API server that was killed, holding its port and memory:
            # the rest of its process group goes too.
            _end_group(self.process.pid, timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None

    def model_cards(self) -> list[dict]:
        """vLLM's ``/v1/models`` entries: the base (``root``: the path or id it loaded) and each adapter."""
        r = httpx.get(f"{self.url}/v1/models", timeout=10, headers=self._auth)
        r.raise_for_status()
        return r.json()["data"]

    def models(self) -> list[str]:
        return [m["id"] for m in self.model_cards()]

    def load_adapter(self, name: str, path: Path) -> None:
        _post(f"{self.url}/v1/load_lora_adapter", f"loading adapter {name} from {path}", 120,
              json={"lora_name": name, "lora_path": str(path.resolve())}, headers=self._auth)

    def unload_adapter(self, name: str) -> None:
        _post(f"{self.url}/v1/unload_lora_adapter", f"unloading adapter {name}", 60, json={"lora_name": name},
              headers=self._auth)

    def chat(self, model: str, messages: list[dict], task: TaskConfig | None = None, **overrides) -> str:
        """One OpenAI chat completion straight to vLLM with the task's generation defaults (``overrides``
        win): the follower's smoke test; clients go through the gateway."""
        body = {"model": model, "messages": messages, **generation_defaults(task or TaskConfig()), **overrides}
        r = _post(f"{self.url}/v1/chat/completions", f"chat completion on {model}", 120, json=body,
                  headers=self._auth)
        return r.json()["choices"][0]["message"]["content"]


def not_found(err: ServingError) -> bool:
    """vLLM's answer for an adapter it does not have (404, worded differently across versions)."""
    text = str(err).lower()
    return "http 404" in text or "not found" in text or "does not exist" in text


@dataclass
class VLLMPool:
    """One or more vLLM servers holding the same adapters, used as one: an adapter is loaded only when every
    replica loaded it (a failure on one unloads it from the others), unloaded from all, and the smoke test
    runs on each. ``serve.replicas`` started here, ``serve.upstreams`` (or ``serve.url``) attached."""

    replicas: list[VLLMServer]
    base_dir: Path | None = None  # the base the replicas were started on (None: attached)

    def base_identity(self) -> str | None:
        """Which base every replica serves: a weights sha256 when its model root is a base store folder
        (``.../bases/<sha>``, immutable), ``model:<id>`` for a hub model it loaded by id, or None when the
        replicas disagree or a root is another folder (what it holds now may not be what vLLM loaded)."""
        seen = set()
        for r in self.replicas:
            roots = [m.get("root") or m.get("id") for m in r.model_cards() if not m.get("parent")]
            if len(roots) != 1:
                return None
            root = str(roots[0])
            name = Path(root).name
            if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
                seen.add(name)  # a base store folder: immutable, named by its digest
            elif Path(root).exists():
                return None  # a folder that may have changed since vLLM loaded it: cannot be told
            else:
                seen.add(f"model:{root}")  # a hub id
        return seen.pop() if len(seen) == 1 else None

    @classmethod
    def start(cls, cfg: ServeConfig, base_dir: Path, api_key: str = "") -> "VLLMPool":
        started: list[VLLMServer] = []
        try:
            for i in range(cfg.replicas):
                started.append(VLLMServer.start(replica_config(cfg, i), base_dir, api_key=api_key))
        except BaseException:
            for server in started:
                server.stop()
            raise
        return cls(started, base_dir=Path(base_dir))

    @classmethod
    def attach(cls, cfg: ServeConfig, api_key: str = "") -> "VLLMPool":
        return cls([VLLMServer.attach(cfg.model_copy(update={"url": u, "upstreams": []}), api_key)
                    for u in cfg.upstream_urls])

    @property
    def api_key(self) -> str:
        return self.replicas[0].api_key

    @property
    def url(self) -> str:
        return self.replicas[0].url

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    @property
    def owned(self) -> bool:
        return any(r.owned for r in self.replicas)

    def poll(self) -> int | None:
        """The exit code of a started replica that died (all are restarted together), else None."""
        return next((code for code in (r.poll() for r in self.replicas) if code is not None), None)

    def healthy(self) -> bool:
        return all(r.healthy() for r in self.replicas)

    def wait_ready(self, timeout_s: float | None = None, progress=None) -> float:
        started = time.monotonic()
        for r in self.replicas:  # they start in parallel; waiting in turn costs only the slowest
            r.wait_ready(timeout_s, progress)
        return time.monotonic() - started

    def stop(self, timeout_s: float = 30) -> None:
        for r in self.replicas:
            r.stop(timeout_s)

    def models(self) -> list[str]:
        """The names every replica serves (an adapter on only some of them does not count)."""
        names = [set(r.models()) for r in self.replicas]
        return sorted(set.intersection(*names))

    def load_adapter(self, name: str, path: Path) -> None:
        loaded: list[VLLMServer] = []
        for r in self.replicas:
            try:
                r.load_adapter(name, path)
            except ServingError as err:
                for done in loaded:  # all or none: a route must never reach a replica without it
                    try:
                        done.unload_adapter(name)
                    except ServingError:
                        pass
                where = f"replica {r.url}: " if len(self.replicas) > 1 else ""
                raise ServingError(f"{where}{err}", transient=err.transient) from None
            loaded.append(r)

    def unload_adapter(self, name: str) -> None:
        errors = []
        for r in self.replicas:
            try:
                r.unload_adapter(name)
            except ServingError as err:
                if not not_found(err):  # a replica a failed load never reached
                    errors.append(err)
        if errors:
            raise errors[0]


def _end_group(pgid: int, timeout_s: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s / 2
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def generation_defaults(task: TaskConfig) -> dict:
    """The OpenAI request fields that make a served answer match what the gate measured."""
    return task.generation_defaults()

