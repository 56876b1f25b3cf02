"""Keep each stable model name on its champion: load, smoke-test, switch atomically, retire the old adapter.

A new version is loaded into vLLM under a fresh internal name (``<model>-v<version>-<random>``: vLLM's
prefix cache is keyed by adapter name, so a same-name reload could answer from the old weights), a few
held-out prompts must produce answers the task's parser accepts, and only then does the gateway's route
switch. The old adapter is unloaded once its in-flight requests finished. A version that fails to load
or answers garbage is never routed to: the previous one keeps serving, the version gets a
``serving_status`` tag saying why, and an alias still pointing at it is moved back to the served version.
Registry or vLLM errors are reported and retried by the caller's loop; they never stop serving.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import RegistryConfig, TaskConfig
from pipeline import registry
from pipeline.serve.gateway import Route, Routes
from pipeline.serve.vllm import ServingError, VLLMServer
from pipeline.tasks import build_task

def task_of(version: registry.VersionInfo, default: TaskConfig) -> TaskConfig:
    raw = version.tags.get("task_config")
    return TaskConfig.model_validate_json(raw) if raw else default


def smoke_prompts_of(version: registry.VersionInfo, default: list[list[dict]]) -> list[list[dict]]:
    raw = version.tags.get("smoke_prompts")
    return json.loads(raw) if raw else default


def smoke_test(server: VLLMServer, internal: str, task: TaskConfig, prompts: list[list[dict]]) -> list[str]:
    """Problems with the adapter's answers to ``prompts`` (empty = it answers like the task expects)."""
    checker = build_task(task)
    problems = []
    for i, messages in enumerate(prompts):
        answer = server.chat(internal, messages, task=task, temperature=0.0)
        why = checker.check_reference(answer)
        if why:
            problems.append(f"prompt {i + 1}: {why} (answer: {answer[:80]!r})")
    return problems


@dataclass
class Follower:
    server: VLLMServer
    routes: Routes
    registry_cfg: RegistryConfig
    adapters_dir: Path
    models: list[str]
    default_task: TaskConfig
    default_prompts: list[list[dict]]
    say: Callable[[str], None] = print
    on_reject: Callable[[dict], None] | None = None  # e.g. a Prefect event, wired in flows/
    rejected: dict[str, set[int]] = field(default_factory=dict)
    # The weights vLLM runs (None: unknown, an attached server), and how to restart it on another base.
    base_sha: str | None = None
    rebase: Callable[[str], VLLMServer] | None = None

    def reconcile(self) -> list[dict]:
        """One pass over every served model; returns what changed."""
        return [r for r in (self.follow(name) for name in self.models) if r]

    def follow(self, name: str) -> dict | None:
        champion = registry.get_alias(self.registry_cfg, name)
        current = self.routes.get(name)
        if champion is None or (current and current.version == champion.version):
            return None
        if champion.version in self.rejected.get(name, set()):
            return None
        return self.swap(name, champion, current)

    def swap(self, name: str, champion: registry.VersionInfo, current: Route | None) -> dict:
        internal = f"{name}-v{champion.version}-{secrets.token_hex(3)}"
        started = time.monotonic()
        task = task_of(champion, self.default_task)
        want = champion.tags.get("base_weights_sha256")
        if want and self.base_sha and want != self.base_sha:
            if self.rebase is None:
                return self._reject(name, champion, current, "trained on another base than the one vLLM serves; "
                                    "restart vLLM on that base")
            try:
                self.server = self.rebase(want)
            except Exception as e:  # noqa: BLE001 - the version cannot be served here; the alias goes back
                return self._reject(name, champion, current, f"base change failed: {e}")
            self.base_sha, current = want, None
        try:
            adapter = registry.download_adapter(self.registry_cfg, champion, self.adapters_dir)
            self.server.load_adapter(internal, adapter)
        except Exception as e:  # noqa: BLE001 - any failure to load keeps the old version serving
            return self._reject(name, champion, current, f"load failed: {e}")
        problems = smoke_test(self.server, internal, task, smoke_prompts_of(champion, self.default_prompts))
        if problems:
            self._unload(internal)
            return self._reject(name, champion, current, "smoke test failed: " + "; ".join(problems))
        previous = self.routes.set(Route(name, internal, champion.version, task))
        seconds = time.monotonic() - started
        registry.set_version_tag(self.registry_cfg, name, champion.version, "serving_status", "served")
        self.say(f"{name}: serving v{champion.version} (adapter {internal}, ready in {seconds:.1f}s)"
                 + (f", v{previous.version} retires after its in-flight requests" if previous else ""))
        if previous:
            threading.Thread(target=self._retire, args=(previous,), daemon=True).start()
        return {"model": name, "version": champion.version, "adapter": internal, "seconds": round(seconds, 2),
                "previous": previous.version if previous else None}

    def _retire(self, route: Route) -> None:
        if not self.routes.wait_drained(route.internal):
            self.say(f"{route.name}: v{route.version} still had requests in flight after 300s; unloading anyway")
        self._unload(route.internal)

    def _unload(self, internal: str) -> None:
        try:
            self.server.unload_adapter(internal)
        except ServingError as e:
            self.say(f"warning: {e}")

    def _reject(self, name: str, champion: registry.VersionInfo, current: Route | None, reason: str) -> dict:
        self.rejected.setdefault(name, set()).add(champion.version)
        self.say(f"{name}: v{champion.version} NOT served: {reason}")
        registry.set_version_tag(self.registry_cfg, name, champion.version, "serving_status",
                                 f"rejected: {reason}"[:4000])
        restored = None
        if current is not None:
            # Compare-and-set: move the alias back only if it still names the rejected version.
            try:
                registry.promote(self.registry_cfg, name, current.version, expected=champion.version)
                restored = current.version
                self.say(f"{name}: alias @{self.registry_cfg.alias} moved back to v{current.version}, which keeps serving")
            except registry.AliasMoved as moved:
                self.say(f"{name}: alias left alone: {moved}")
        result = {"model": name, "version": champion.version, "rejected": reason, "alias_restored_to": restored}
        if self.on_reject is not None:
            self.on_reject(result)
        return result
