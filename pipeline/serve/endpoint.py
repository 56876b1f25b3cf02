"""The served endpoint as one object: vLLM (started or attached) + the follower + the gateway + its log.

``loraflow serve`` and the demo both run this, so the demo's traffic takes the path real clients take
(authenticated gateway, stable model name, task defaults, redacted request log). vLLM starts first and
slowly (minutes on CPU); ``open`` waits for it, loads each model's champion and then starts answering.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import Params
from pipeline.serve.follow import Follower
from pipeline.serve.gateway import GatewayServer, RequestLog, Routes, build_app
from pipeline.serve.vllm import VLLMServer

VLLM_KEY_ENV = "LORAFLOW_VLLM_API_KEY"  # the key of a vLLM that serve.url points at (attach mode)


def start_vllm(p: Params, say: Callable[[str], None] = print) -> VLLMServer:
    """Attach to ``serve.url`` or start vLLM on 127.0.0.1 with a fresh random key only the gateway holds."""
    import os

    if p.serve.url:
        return VLLMServer.attach(p.serve, os.environ.get(VLLM_KEY_ENV, ""))
    say(f"starting vLLM on {p.serve.base_url}, reachable only from this host (log: {p.serve.log_file})")
    return VLLMServer.start(p.serve, Path(p.base.out_dir), api_key=secrets.token_urlsafe(32))


@dataclass
class Endpoint:
    p: Params
    server: VLLMServer
    keys: set[str]
    say: Callable[[str], None] = print
    on_reject: Callable[[dict], None] | None = None
    webhook_secret: str = ""
    routes: Routes = field(default_factory=Routes)
    wake: threading.Event = field(default_factory=threading.Event)  # set by a webhook: reconcile now
    gateway: GatewayServer | None = None
    follower: Follower | None = None
    log: RequestLog | None = None

    @property
    def models(self) -> list[str]:
        return self.p.serve.models or [self.p.project.name]

    @property
    def url(self) -> str:
        if self.gateway is None:
            raise RuntimeError("the endpoint is not open")
        return self.gateway.url

    def open(self) -> "Endpoint":
        """Wait for vLLM, serve each model's champion, start answering clients."""
        from pipeline.release.promotion import smoke_prompts
        from pipeline.stages import clean_split

        p = self.p
        waited = self.server.wait_ready(progress=self.say)
        self.say(f"vLLM ready after {waited:.0f}s")
        self.follower = Follower(self.server, self.routes, p.registry, Path(p.serve.adapters_dir), self.models,
                                 p.task, smoke_prompts(clean_split(p, "eval")), say=self.say,
                                 on_reject=self.on_reject)
        try:
            self.reconcile()
        except Exception as e:  # noqa: BLE001 - answer anyway; follow() retries with backoff
            self.say(f"warning: could not reach the registry yet ({type(e).__name__}: {e}); retrying")
        self.log = RequestLog(Path(p.serve.traffic_log), int(p.serve.log_max_mb * 2**20),
                              p.serve.log_retention_days, tuple(p.sanitize.phone_regions))
        app = build_app(self.routes, self.server.url, self.server.api_key, self.keys, self.log,
                        webhook_secret=self.webhook_secret, on_alias=self._on_alias)
        self.gateway = GatewayServer(app, p.serve.gateway_host, p.serve.gateway_port).start()
        return self

    def _on_alias(self, name: str, alias: str, version: int) -> None:
        if name in self.models and alias == self.p.registry.alias:
            self.say(f"webhook: {name}@{alias} -> v{version}")
            self.wake.set()

    def reconcile(self) -> list[dict]:
        """Bring every stable name onto its champion now (raises on MLflow/vLLM errors)."""
        assert self.follower is not None, "open() first"
        return self.follower.reconcile()

    def served(self) -> str:
        return ", ".join(f"{r.name} (v{r.version})" for r in self.routes.all()) or "nothing yet (no champion)"

    def follow(self, stop: threading.Event) -> None:
        """Reconcile every ``serve.poll_interval_s`` (or at once on a webhook) until ``stop`` is set. Errors
        are reported and retried with exponential backoff; they never stop serving."""
        poll = self.p.serve.poll_interval_s
        delay = poll
        while not stop.is_set():
            self.wake.wait(delay)
            self.wake.clear()
            if stop.is_set():
                break
            try:
                self.reconcile()
                delay = poll
            except Exception as e:  # noqa: BLE001 - MLflow or vLLM hiccups: report, back off, keep serving
                delay = min(delay * 2, 300)
                self.say(f"warning: could not reconcile with the registry ({type(e).__name__}: {e}); "
                         f"retry in {delay:.0f}s")

    def stop(self) -> None:
        """Stop answering, flush the request log, stop the vLLM this endpoint started."""
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        if self.log is not None:
            self.log.flush()
        self.server.stop()
        self.wake.set()
