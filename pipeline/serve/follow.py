"""Keep each stable model name on its champion: load, smoke-test, switch atomically, retire the old adapter.

A new version is loaded into vLLM under a fresh internal name (``<model>-v<version>-<random>``: vLLM's
prefix cache is keyed by adapter name, so a same-name reload could answer from the old weights), a few
held-out prompts must produce answers the task's parser accepts, and only then does the gateway's route
switch. The old adapter is unloaded once its in-flight requests finished.

Two kinds of failure, handled differently:
- **the version is bad**: vLLM refuses it (a 4xx: its rank, its shape) or its answers fail the smoke test.
  It is never routed to. The rejection is written to the registry first (``serving_status`` tag, retried);
  only once it is recorded is the alias moved back to the served version. A rejection that could not be
  recorded is not acted on: the next pass tries again.
- **it could not be fetched or loaded right now** (storage, the registry or vLLM busy, a timeout, a 5xx):
  the current version keeps serving, nothing is tagged, the alias stays, and the swap is retried on later
  passes with a doubling wait.
Whatever was loaded for a swap that did not finish is unloaded. Registry errors while reading the alias
are raised to the caller's loop, which retries; they never stop serving.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline.config import RegistryConfig, TaskConfig
from pipeline import registry
from pipeline.serve.gateway import Route, Routes
from pipeline.serve.vllm import ServingError, VLLMPool, VLLMServer, not_found
from pipeline.tasks import build_task

class BaseUnavailable(RuntimeError):
    """The base a version needs cannot be served right now (not on this machine, or its engine did not
    start): "not now", never a verdict on the version."""


def base_matches(have: str | None, champion: registry.VersionInfo) -> bool:
    """Whether an attached vLLM serving base ``have`` (``VLLMPool.base_identity``) can take ``champion``'s
    adapter: the same weights digest, or the same hub model id for a version trained on a hub model."""
    want = champion.tags.get("base_weights_sha256")
    if not want or have == want:
        return True
    model = champion.tags.get("base_model", "")
    return bool(have and have.startswith("model:") and model and not model.startswith("builtin:")
                and have[len("model:"):] == model)


def task_of(version: registry.VersionInfo, default: TaskConfig) -> TaskConfig:
    raw = version.tags.get("task_config")
    return TaskConfig.model_validate_json(raw) if raw else default


def smoke_prompts_of(version: registry.VersionInfo, default: list[list[dict]]) -> list[list[dict]]:
    raw = version.tags.get("smoke_prompts")
    return json.loads(raw) if raw else default


def smoke_test(server: VLLMServer | VLLMPool, internal: str, task: TaskConfig,
               prompts: list[list[dict]]) -> list[str]:
    """Problems with the adapter's answers to ``prompts`` on every replica (empty = it answers like the
    task expects everywhere)."""
    checker = build_task(task)
    problems = []
    replicas = server.replicas if isinstance(server, VLLMPool) else [server]
    for replica in replicas:
        where = f"replica {replica.url}, " if len(replicas) > 1 else ""
        for i, messages in enumerate(prompts):
            answer = replica.chat(internal, messages, task=task, temperature=0.0)
            why = checker.check_reference(answer)
            if why:
                problems.append(f"{where}prompt {i + 1}: {why} (answer: {answer[:80]!r})")
    return problems


@dataclass
class Follower:
    server: VLLMServer | VLLMPool  # a pool: swapped on every replica before the route switches
    routes: Routes
    registry_cfg: RegistryConfig
    adapters_dir: Path
    models: list[str]
    default_task: TaskConfig
    default_prompts: list[list[dict]]
    say: Callable[[str], None] = print
    on_reject: Callable[[dict], None] | None = None  # e.g. a Prefect event, wired in flows/
    # The serving log (``layout.serving_log``): one line per version served, rejected or stopped; the
    # dossier's serving periods. ``on_change`` hears the same (the dossier is regenerated on it).
    events_log: Path | None = None
    on_change: Callable[[dict], None] | None = None
    rejected: dict[str, set[int]] = field(default_factory=dict)
    # name -> (version, attempts, monotonic time of the next try): swaps that failed for a transient reason.
    deferred: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    seen_alias: dict[str, int] = field(default_factory=dict)  # the alias version last recorded in the history
    # The last version each name served well: where a rejected alias goes back to even when nothing is
    # routed right now (vLLM restarting).
    last_good: dict[str, int] = field(default_factory=dict)
    retry_base_s: float = 5.0
    retry_max_s: float = 300.0
    # The weights vLLM runs (None: unknown, an attached server), and how to restart it on another base.
    base_sha: str | None = None
    rebase: Callable[[str], VLLMServer | VLLMPool] | None = None
    # An attached vLLM (compose, Kubernetes): which base it serves, asked before every load, and where to
    # say which base the champion needs (the base store's ``serving`` link, what its operator starts it on).
    attached_base: Callable[[], str | None] | None = None
    want_base: Callable[[str], None] | None = None

    def reconcile(self) -> list[dict]:
        """One pass over every served model; returns what changed."""
        return [r for r in (self.follow(name) for name in self.models) if r]

    def follow(self, name: str) -> dict | None:
        champion = registry.get_alias(self.registry_cfg, name)  # RegistryUnavailable: the caller retries
        current = self.routes.get(name)
        if champion is not None and self.seen_alias.get(name) != champion.version:
            # A move loraflow did not make (the MLflow UI) enters the alias history here, for rollback.
            try:
                registry.reconcile_history(self.registry_cfg, name)  # re-reads the alias itself
                self.seen_alias[name] = champion.version
            except registry.RegistryUnavailable as e:
                self.say(f"warning: {e}")
        if champion is None or (current and current.version == champion.version):
            self.deferred.pop(name, None)
            return None
        if champion.version in self.rejected.get(name, set()) or \
                champion.tags.get("serving_status", "").startswith("rejected"):
            # Recorded as bad (maybe by an earlier process); the alias move back may not have happened yet.
            self.rejected.setdefault(name, set()).add(champion.version)
            return self._restore(name, champion, current)
        wait = self.deferred.get(name)
        if wait and wait[0] == champion.version and time.monotonic() < wait[2]:
            return None
        return self.swap(name, champion, current)

    def _defer(self, name: str, champion: registry.VersionInfo, reason: str) -> dict:
        """A transient failure: keep serving, retry this version later with a doubling wait."""
        _, attempts, _ = self.deferred.get(name, (champion.version, 0, 0.0))
        delay = min(self.retry_base_s * 2 ** attempts, self.retry_max_s)
        self.deferred[name] = (champion.version, attempts + 1, time.monotonic() + delay)
        self.say(f"{name}: v{champion.version} not served yet ({reason}); the current version keeps serving, "
                 f"retry in {delay:.0f}s")
        return {"model": name, "version": champion.version, "deferred": reason, "retry_in_s": delay}

    def swap(self, name: str, champion: registry.VersionInfo, current: Route | None) -> dict:
        internal = f"{name}-v{champion.version}-{secrets.token_hex(3)}"
        started = time.monotonic()
        task = task_of(champion, self.default_task)
        want = champion.tags.get("base_weights_sha256")
        if want and self.attached_base is not None:
            # Never load an adapter onto a base it was not trained on: an attached vLLM is restarted by its
            # operator (compose, Kubernetes), so a mismatch waits for that, reported on every try.
            if self.want_base is not None:
                try:
                    self.want_base(want)
                except OSError as e:
                    self.say(f"warning: could not point the base store at {want[:12]}: {e}")
            try:
                have = self.attached_base()
            except Exception as e:  # noqa: BLE001 - vLLM busy or restarting: ask again later
                return self._defer(name, champion, f"could not ask vLLM which base it serves: {e}")
            if not base_matches(have, champion):
                return self._defer(name, champion, f"trained on base {want[:12]}, but the attached vLLM serves "
                                   + (f"{have[:18]}" if have else "a base it cannot be identified by (start it on "
                                      "artifacts/bases/<sha>, as docker-compose.yml and deploy/kubernetes do)")
                                   + "; not loaded")
        elif want and self.base_sha and want != self.base_sha:
            others = [m for m in self.models if m != name and self.routes.get(m) is not None]
            if others and name != self.models[0]:
                # One base per engine: the first model's champion decides it (serving_base); restarting for
                # this one would take the others down, and they would restart it back.
                return self._defer(name, champion, f"trained on base {want[:12]}, but vLLM serves "
                                   f"{self.base_sha[:12]} for {', '.join(others)}; not loaded")
            if self.rebase is None:
                return self._defer(name, champion, f"trained on base {want[:12]}, vLLM serves {self.base_sha[:12]} "
                                   "and cannot be restarted from here; not loaded")
            try:
                self.server = self.rebase(want)
            except Exception as e:  # noqa: BLE001 - not the version's fault: missing base, failed start
                deferred = self._defer(name, champion, f"base change not done: {e}")
                self._fall_back(name, champion)
                return deferred
            self.base_sha, current = want, None
        try:
            adapter = registry.download_adapter(self.registry_cfg, champion, self.adapters_dir)
        except Exception as e:  # noqa: BLE001 - storage or registry: not the version's fault
            return self._defer(name, champion, f"download failed: {type(e).__name__}: {e}")
        try:
            self.server.load_adapter(internal, adapter)
        except ServingError as e:
            if e.transient:
                self._unload(internal)  # a timed-out load may still complete inside vLLM
                return self._defer(name, champion, f"load failed: {e}")
            return self._reject(name, champion, current, f"load failed: {e}")
        try:
            problems = smoke_test(self.server, internal, task, smoke_prompts_of(champion, self.default_prompts))
        except ServingError as e:
            self._unload(internal)
            if e.transient:
                return self._defer(name, champion, f"smoke test interrupted: {e}")
            return self._reject(name, champion, current, f"smoke test could not run: {e}")
        except BaseException:
            self._unload(internal)
            raise
        if problems:
            self._unload(internal)
            return self._reject(name, champion, current, "smoke test failed: " + "; ".join(problems))
        previous = self.routes.set(Route(name, internal, champion.version, task))
        self.deferred.pop(name, None)
        self.last_good[name] = champion.version
        seconds = time.monotonic() - started
        try:
            registry.set_version_tag(self.registry_cfg, name, champion.version, "serving_status", "served")
        except registry.RegistryUnavailable as e:  # serving is right; the tag is information only
            self.say(f"warning: {e}")
        self.record({"event": "served", "model": name, "version": champion.version,
                     "previous": previous.version if previous else None})
        self.say(f"{name}: serving v{champion.version} (adapter {internal}, ready in {seconds:.1f}s)"
                 + (f", v{previous.version} retires after its in-flight requests" if previous else ""))
        if previous:
            threading.Thread(target=self._retire, args=(previous,), daemon=True).start()
        return {"model": name, "version": champion.version, "adapter": internal, "seconds": round(seconds, 2),
                "previous": previous.version if previous else None}

    def _fall_back(self, name: str, champion: registry.VersionInfo) -> None:
        """While the champion's base cannot be served, serve the last version that served well, when it runs
        on the base vLLM has (the base change emptied every route). The alias is left alone: the champion
        is tried again after its wait."""
        back = self.last_good.get(name)
        if back is None or back == champion.version or self.routes.get(name) is not None:
            return
        try:
            info = registry.get_version(self.registry_cfg, name, back)
        except Exception as e:  # noqa: BLE001 - the next pass tries again
            self.say(f"{name}: could not read v{back} to serve it meanwhile: {e}")
            return
        if info.tags.get("base_weights_sha256") not in (None, self.base_sha):
            return
        wait = self.deferred.get(name)
        try:
            result = self.swap(name, info, None)
        finally:  # the champion's own wait stands, whatever became of the stand-in
            if wait is not None:
                self.deferred[name] = wait
        if result.get("adapter"):
            self.say(f"{name}: serving v{back} meanwhile (v{champion.version}'s base is not available yet)")

    def record(self, event: dict) -> None:
        """Append to the serving log, then tell ``on_change``. Neither may stop serving: both only warn."""
        event = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **event}
        if self.events_log is not None:
            try:
                self.events_log.parent.mkdir(parents=True, exist_ok=True)
                with open(self.events_log, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(event) + "\n")
            except OSError as e:
                self.say(f"warning: serving log {self.events_log} not written: {e}")
        if self.on_change is not None:
            try:
                self.on_change(event)
            except Exception as e:  # noqa: BLE001 - bookkeeping; the swap is done
                self.say(f"warning: after {event['event']} v{event['version']}: {type(e).__name__}: {e}")

    def _retire(self, route: Route) -> None:
        if not self.routes.wait_drained(route.internal):
            self.say(f"{route.name}: v{route.version} still had requests in flight after 300s; unloading anyway")
        self._unload(route.internal)

    def _unload(self, internal: str) -> None:
        try:
            self.server.unload_adapter(internal)
        except ServingError as e:
            if not not_found(e):
                self.say(f"warning: {e}")

    def _reject(self, name: str, champion: registry.VersionInfo, current: Route | None, reason: str) -> dict:
        self.say(f"{name}: v{champion.version} NOT served: {reason}")
        try:  # recorded first: a rejection nobody can see must not move the alias
            registry.set_version_tag(self.registry_cfg, name, champion.version, "serving_status",
                                     f"rejected: {reason}"[:4000])
        except registry.RegistryUnavailable as e:
            return self._defer(name, champion, f"rejection not recorded yet ({e})")
        self.rejected.setdefault(name, set()).add(champion.version)
        self.deferred.pop(name, None)
        self.record({"event": "rejected", "model": name, "version": champion.version, "reason": reason[:500]})
        result = {**(self._restore(name, champion, current) or {"model": name, "version": champion.version,
                                                                 "alias_restored_to": None}), "rejected": reason}
        if self.on_reject is not None:
            self.on_reject(result)
        return result

    def _restore(self, name: str, champion: registry.VersionInfo, current: Route | None) -> dict | None:
        """Move the alias back from a rejected version to the served one (compare-and-set: only if it still
        names the rejected version). None when there is nothing to do or it must wait for the registry."""
        back = current.version if current is not None else self.last_good.get(name)
        if back is None or back == champion.version:
            return None
        try:
            registry.promote(self.registry_cfg, name, back, expected=champion.version,
                             by=f"loraflow serve: v{champion.version} rejected")
        except registry.AliasMoved as moved:
            self.say(f"{name}: alias left alone: {moved}")
            return None
        except registry.RegistryUnavailable as e:
            self.say(f"{name}: alias still on rejected v{champion.version}; moving it back when the registry "
                     f"answers ({e})")
            return None
        self.say(f"{name}: alias @{self.registry_cfg.alias} moved back to v{back}, the last version served well "
                 f"(to try v{champion.version} again, remove its serving_status tag)")
        return {"model": name, "version": champion.version, "alias_restored_to": back}
