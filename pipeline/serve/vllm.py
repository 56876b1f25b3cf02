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
from dataclasses import dataclass
from pathlib import Path

import httpx

from pipeline.config import ServeConfig, TaskConfig
from pipeline.modeling import BaseMissing, resolve_base


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
        *cfg.extra_args,
    ]


@dataclass
class VLLMServer:
    """A vLLM server process owned by loraflow (``start``) or one already running (``attach``)."""

    cfg: ServeConfig
    process: subprocess.Popen | None = None
    _log: object = None  # the log file handle the process writes to, closed on stop
    api_key: str = ""    # vLLM's own key (VLLM_API_KEY): only the gateway and loraflow hold it

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
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true", **cfg.env}
        if api_key:  # through the environment, not argv: the command line is visible to every local user
            env["VLLM_API_KEY"] = api_key
        # Our own venv's variables must not leak into vLLM's interpreter.
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        fh = open(log, "ab")
        proc = subprocess.Popen(launch_command(cfg, base_dir), stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        return cls(cfg, proc, fh, api_key)

    @classmethod
    def attach(cls, cfg: ServeConfig, api_key: str = "") -> "VLLMServer":
        return cls(cfg, None, None, api_key)

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float | None = None, progress=None) -> float:
        """Block until /health answers; returns seconds waited. Fails fast if the process dies."""
        timeout_s = timeout_s or self.cfg.startup_timeout_s
        started = time.monotonic()
        last_note = 0.0
        while True:
            if self.healthy():
                return time.monotonic() - started
            if self.process is not None and self.process.poll() is not None:
                raise ServingError(f"vLLM exited with code {self.process.returncode} during start-up; "
                                   f"last lines of {self.cfg.log_file}:\n{tail(Path(self.cfg.log_file))}")
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

    def models(self) -> list[str]:
        r = httpx.get(f"{self.url}/v1/models", timeout=10, headers=self._auth)
        r.raise_for_status()
        return [m["id"] for m in r.json()["data"]]

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


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"
