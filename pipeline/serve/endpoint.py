"""The served endpoint as one object: vLLM (started or attached) + the follower + the gateway + its log.

``loraflow serve`` and the demo both run this, so the demo's traffic takes the path real clients take
(authenticated gateway, stable model name, task defaults, redacted request log). vLLM starts first and
slowly (minutes on CPU). ``open`` starts the gateway (it answers /health at once, clients get 503 until a
version is served), waits for vLLM and loads each model's champion; ``loraflow serve`` may first wait for
the base model (the platform's first retrain builds it). When a new champion was trained on another base
(the builtin base is rebuilt from new training data), the vLLM this endpoint started is restarted on it.

The engine is supervised (``supervise``): when the vLLM this endpoint started dies, every route is dropped
at once (clients get 503 with Retry-After, not a hang), vLLM is restarted with a doubling wait, and the
follower loads and smoke-tests each champion again. A vLLM attached by URL is health-checked the same way;
when it comes back without the adapters (it restarted), they are loaded again. The counts are in the log
and in the gateway's /health (``loraflow status`` shows them).
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import Params
from pipeline.io import first_prompts
from pipeline.layout import clean_split, feedback_log, serving_log
from pipeline.modeling import BaseMissing, base_dir_for, base_present, base_weights_sha256, point, publish_base
from pipeline.pii import build_redactor
from pipeline.serve.follow import BaseUnavailable, Follower
from pipeline.serve.gateway import GatewayServer, RequestLog, Routes, build_app
from pipeline.serve.vllm import ServingError, VLLMPool

VLLM_KEY_ENV = "LORAFLOW_VLLM_API_KEY"  # the key of a vLLM that serve.url points at (attach mode)


def vllm_key(p: Params) -> str:
    """vLLM's own key: the attached server's (``LORAFLOW_VLLM_API_KEY``), else a fresh one only the gateway holds."""
    import os

    return os.environ.get(VLLM_KEY_ENV, "") if p.serve.attached else secrets.token_urlsafe(32)


def serving_base(p: Params, say: Callable[[str], None] = print) -> Path:
    """The base vLLM starts on, always a base store folder (immutable: a later rebuild of ``base.out_dir``
    cannot change what a restart loads): the one the first model's champion was trained on when it is on
    this machine (a data change may have rebuilt ``base.out_dir`` while the gate kept the old champion), else
    the current base. A registry that cannot be read is "unknown", not "no champion": the current base, and
    the follower restarts vLLM on the champion's base once it reads the alias."""
    from pipeline import registry

    current = Path(p.base.out_dir)
    if base_present(current):  # a base restored by DVC, or built before the store existed, goes in too
        try:
            current = publish_base(current, Path(p.base.store_dir), beside=False)
        except OSError as e:
            say(f"warning: could not copy the current base into {p.base.store_dir} ({e}); starting vLLM on "
                f"{current}, which the next base build changes under it")
    name = (p.serve.models or [p.project.name])[0]
    try:
        champion = registry.get_alias(p.registry, name)
    except registry.RegistryUnavailable as e:
        say(f"warning: the registry did not answer ({e}); starting vLLM on the current base {current}")
        return current
    want = champion.tags.get("base_weights_sha256") if champion else None
    if not want:
        return current
    try:
        return stored_base(p, want)
    except BaseMissing as e:
        say(f"warning: {name}@{p.registry.alias} v{champion.version}: {e}; starting vLLM on the current base")
        return current


def stored_base(p: Params, sha: str) -> Path:
    """The base store folder of base ``sha`` (copied from ``base.out_dir`` first when only that holds it):
    vLLM never runs from the mutable DVC output, so a restart loads what it loaded before."""
    found = base_dir_for(Path(p.base.out_dir), Path(p.base.store_dir), sha)
    if found == Path(p.base.out_dir):
        found = publish_base(found, Path(p.base.store_dir), beside=False)
    return found


def start_vllm(p: Params, say: Callable[[str], None] = print, api_key: str | None = None) -> VLLMPool:
    """Attach to ``serve.url``/``serve.upstreams`` or start ``serve.replicas`` vLLM processes on 127.0.0.1
    with a key only the gateway holds, on the base the champion needs (``serving_base``)."""
    key = vllm_key(p) if api_key is None else api_key
    if p.serve.attached:
        return VLLMPool.attach(p.serve, key)
    urls = ", ".join(p.serve.upstream_urls)
    base = serving_base(p, say)
    say(f"starting vLLM on {urls} with base {base}, reachable only from this host (log: {p.serve.log_file})")
    return VLLMPool.start(p.serve, base, api_key=key)


def wait_for_base(p: Params, stop: threading.Event, say: Callable[[str], None] = print, every_s: float = 5) -> bool:
    """Until the base model exists (False if ``stop`` was set first): an endpoint started before the first
    retrain answers 503 meanwhile instead of failing."""
    base = Path(p.base.out_dir)
    if p.serve.attached or base_present(base):
        return True
    say(f"waiting for the base model at {base} (the first retrain builds it); clients get 503 until then")
    while not stop.wait(every_s):
        if base_present(base):
            return True
    return False


@dataclass
class Endpoint:
    p: Params
    server: VLLMPool | None  # None until start_vllm (``loraflow serve`` may wait for the base first)
    keys: set[str]
    say: Callable[[str], None] = print
    on_reject: Callable[[dict], None] | None = None
    on_change: Callable[[dict], None] | None = None  # a version served, rejected or stopped (Follower.record)
    webhook_secret: str = ""
    routes: Routes = field(default_factory=Routes)
    wake: threading.Event = field(default_factory=threading.Event)  # set by a webhook: reconcile now
    gateway: GatewayServer | None = None
    follower: Follower | None = None
    log: RequestLog | None = None
    feedback: RequestLog | None = None  # POST /v1/feedback's log, next to the request log
    upstream_key: str = ""  # vLLM's key; defaults to the started server's
    engine: dict = field(default_factory=lambda: {"restarts": 0, "outages": 0, "last_exit": None, "up": True})
    _engine_lock: threading.Lock = field(default_factory=threading.Lock)  # a restart (rebase, supervisor) at a time
    _stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def models(self) -> list[str]:
        return self.p.serve.models or [self.p.project.name]

    @property
    def url(self) -> str:
        if self.gateway is None:
            raise RuntimeError("the endpoint is not open")
        return self.gateway.url

    def open(self) -> "Endpoint":
        """Start answering, wait for vLLM, serve each model's champion."""
        self.start_gateway()
        self.attach_backend()
        return self

    def start_gateway(self) -> "Endpoint":
        """The gateway answers from now on (/health at once; 503 for a model until a version is served)."""
        p = self.p
        key = self.upstream_key or (self.server.api_key if self.server else "")
        redactor = build_redactor(p.sanitize)  # the sanitizer's, custom patterns included, for both logs
        self.log = RequestLog(Path(p.serve.traffic_log), int(p.serve.log_max_mb * 2**20),
                              p.serve.log_retention_days, redactor, p.serve.log_rotate_hours)
        self.feedback = RequestLog(feedback_log(p), int(p.serve.log_max_mb * 2**20), p.serve.log_retention_days,
                                   redactor, p.serve.log_rotate_hours, text_fields=("correction", "comment"))
        app = build_app(self.routes, p.serve.upstream_urls, key, self.keys, self.log, engine=self.engine,
                        webhook_secret=self.webhook_secret, on_alias=self._on_alias, known=frozenset(self.models),
                        limits=p.serve.limits, feedback=self.feedback, curate=p.curate)
        self.gateway = GatewayServer(app, p.serve.gateway_host, p.serve.gateway_port).start()
        return self

    def attach_backend(self) -> None:
        """Wait for vLLM, then bring every stable name onto its champion."""
        p = self.p
        assert self.server is not None, "start_vllm first"
        waited = self.server.wait_ready(progress=self.say)
        self.say(f"vLLM ready after {waited:.0f}s")
        started_here = self.server.owned
        self.follower = Follower(self.server, self.routes, p.registry, Path(p.serve.adapters_dir), self.models,
                                 p.task, first_prompts(clean_split(p, "eval")), say=self.say,
                                 on_reject=self.on_reject, events_log=serving_log(p), on_change=self.on_change,
                                 base_sha=self._started_base_sha() if started_here else None,
                                 rebase=self._rebase if started_here else None,
                                 attached_base=None if started_here else self._attached_base,
                                 want_base=None if started_here else self._want_base)
        try:
            self.reconcile()
        except Exception as e:  # noqa: BLE001 - answer anyway; follow() retries with backoff
            self.say(f"warning: could not reach the registry yet ({type(e).__name__}: {e}); retrying")
        threading.Thread(target=self.supervise, daemon=True, name="loraflow-vllm-supervisor").start()

    def supervise(self, every_s: float = 1.0, max_delay_s: float = 60.0) -> None:
        """Watch the engine until ``stop``: restart a started vLLM that died, re-load after an attached one
        came back. Never raises: a failed restart is reported and tried again after a doubling wait."""
        delay = 1.0
        while not self._stopping.wait(every_s):
            with self._engine_lock:
                server = self.server
                if server is None or self.follower is None:
                    continue
                if server.owned:
                    code = server.poll()
                    if code is None:
                        continue
                    self.routes.clear()  # 503 + Retry-After at once instead of connection errors
                    server.stop()  # what is left of it (engine processes) must not hold the port
                    self.engine.update(up=False, last_exit=code)
                    self.engine["restarts"] += 1
                    n = self.engine["restarts"]
                    self.say(f"vLLM exited with code {code}: clients get 503 meanwhile; restart #{n} in {delay:.0f}s")
                    if self._stopping.wait(delay):
                        return
                    new = None
                    try:
                        # The base it ran, which the routed champions need; not whatever base.out_dir holds
                        # now (a rebuild there would put the champion's adapter on a base it never saw).
                        base_dir = self._base_of(server)
                        new = VLLMPool.start(self.p.serve, base_dir, api_key=server.api_key)
                        waited = new.wait_ready()
                    except Exception as e:  # noqa: BLE001 - try again after a longer wait
                        if new is not None:
                            new.stop()  # hung or died during start-up: the next attempt starts clean
                        self.say(f"vLLM restart #{n} failed ({type(e).__name__}: {e}); next try in {2 * delay:.0f}s")
                        delay = min(delay * 2, max_delay_s)
                        continue  # self.server is still the dead one: the next pass restarts again
                    self.server = new
                    self.follower.server = new
                    self.follower.deferred.clear()
                    self.engine["up"] = True
                    delay = 1.0
                    self.say(f"vLLM restarted (#{n}), ready after {waited:.0f}s: loading the served versions again")
                    self.wake.set()  # the follow loop reconciles: every champion is loaded and smoke-tested
                else:
                    healthy = server.healthy()
                    if not healthy and self.engine["up"]:
                        self.engine.update(up=False)
                        self.engine["outages"] += 1
                        self.say(f"vLLM at {server.url} is not answering (outage #{self.engine['outages']}); "
                                 "clients get 503 until it is back")
                    elif healthy and not self.engine["up"]:
                        self.engine["up"] = True
                        try:
                            loaded = set(server.models())
                        except Exception:  # noqa: BLE001 - checked again next second
                            continue
                        if any(r.internal not in loaded for r in self.routes.all()):
                            self.routes.clear()  # it restarted: the adapters are gone
                        self.follower.deferred.clear()  # maybe on the base a waiting champion needs now
                        self.say(f"vLLM at {server.url} answers again: reconciling")
                        self.wake.set()

    def _started_base_sha(self) -> str:
        return base_weights_sha256(self._base_of(self.server))

    def _base_of(self, server: VLLMPool) -> Path:
        """The base ``server`` was started on (the current base for one started before this was recorded)."""
        return server.base_dir or Path(self.p.base.out_dir)

    def _attached_base(self) -> str | None:
        """The weights digest of the base the attached vLLM serves, or None when it cannot be told."""
        return self.server.base_identity() if self.server is not None else None

    def _want_base(self, sha: str) -> None:
        """Point the base store's ``serving`` link at the base the champion needs, when this process sees the
        store (compose's gateway shares its volume): an operator-run vLLM (re)starts on it."""
        store = Path(self.p.base.store_dir)
        if (store / sha).is_dir() and not ((store / "serving").is_symlink()
                                           and (store / "serving").resolve().name == sha):
            point(store, "serving", sha)
            self.say(f"base store: serving -> {sha[:12]} (restart the attached vLLM to serve it, if it runs another)")

    def _rebase(self, want_sha: str) -> VLLMPool:
        """Restart the vLLM this endpoint started on the base ``want_sha`` (from the base store). Raises
        ``BaseUnavailable`` (the follower defers and retries, never rejects) when that base is not on this
        machine or its engine did not start; then the engine is back on the base it had, so the versions
        routed before are loaded again. Every route goes meanwhile: their adapters die with the old process.
        The new engine starts after the old one stops: both would need the GPU memory and the ports at once."""
        try:
            base_dir = stored_base(self.p, want_sha)
        except (BaseMissing, OSError) as e:
            raise BaseUnavailable(str(e)) from None
        assert self.server is not None
        self.say(f"the new champion needs base {want_sha[:12]}: restarting vLLM on {base_dir} "
                 "(clients get 503 until it is ready)")
        with self._engine_lock:  # not a crash: the supervisor must not restart it too
            self.routes.clear()
            old, key = self.server, self.server.api_key
            old_base = self._base_of(old)
            old.stop()
            new = None
            try:
                new = VLLMPool.start(self.p.serve, base_dir, api_key=key)
                waited = new.wait_ready(progress=self.say)
            except Exception as e:  # noqa: BLE001 - not the version's fault: back on the old base, retry later
                if new is not None:
                    new.stop()
                self.say(f"vLLM did not start on base {want_sha[:12]} ({type(e).__name__}: {e}); back on {old_base}")
                back = VLLMPool.start(self.p.serve, old_base, api_key=key)
                self.server = back
                if self.follower is not None:
                    self.follower.server = back
                with contextlib.suppress(Exception):  # not ready: the supervisor restarts it, loads defer
                    back.wait_ready(progress=self.say)
                self.wake.set()  # the served versions are loaded again on the old base
                raise BaseUnavailable(f"vLLM did not start on base {want_sha[:12]}: {e}") from e
            self.server = new
        self.say(f"vLLM ready on the new base after {waited:.0f}s")
        return self.server

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
                delay = min(delay * 2, 30)  # short: serving waits on this once the registry is back
                self.say(f"warning: could not reconcile with the registry ({type(e).__name__}: {e}); "
                         f"retry in {delay:.0f}s")

    def stop(self) -> None:
        """Stop answering, flush the request log, stop the vLLM this endpoint started."""
        self._stopping.set()
        if self.follower is not None:  # the serving periods end here
            for route in self.routes.all():
                self.follower.record({"event": "stopped", "model": route.name, "version": route.version})
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        for log in (self.log, self.feedback):
            if log is not None:
                log.flush()
                log.close()
        if self.server is not None:
            self.server.stop()
        self.wake.set()
