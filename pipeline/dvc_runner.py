"""Run DVC stages and pushes from Python; DVC decides what is stale, so unchanged stages are skipped.

DVC executes each stage's ``cmd`` in a shell; we put this interpreter's directory first on PATH so
``python -m pipeline <stage>`` runs in the same environment as the caller. DVC holds a repository
lock, so calls here must be serialised (the flow runs them one after another).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class StageRun:
    stage: str
    ran: bool  # False: DVC found deps, params and outs unchanged and skipped it
    seconds: float


def stage_names(root: Path = Path(".")) -> list[str]:
    """Stages in dvc.yaml order, which is also a topological order of the DAG."""
    return list((yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages", {}))


@contextmanager
def _interpreter_first_on_path():
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), old])
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _outs(stage: str, root: Path) -> list | None:
    lock = root / "dvc.lock"
    if not lock.is_file():
        return None
    return ((yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {}).get(stage) or {}).get("outs")


def repro(stage: str, root: Path = Path(".")) -> StageRun:
    """Reproduce one stage. An ``always_changed`` stage (it re-hashes files DVC cannot see) runs every time;
    it counts as run only when its outputs changed, so "nothing new" stays detectable."""
    from dvc.repo import Repo

    spec = (yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages", {}).get(stage, {})
    always = bool(spec.get("always_changed"))
    before = _outs(stage, root) if always else None
    started = time.perf_counter()
    with _interpreter_first_on_path(), Repo(str(root)) as repo:
        done = repo.reproduce(stage, single_item=True)
    ran = bool(done) and (not always or before is None or _outs(stage, root) != before)
    return StageRun(stage, ran, round(time.perf_counter() - started, 2))


def changed_inputs(root: Path = Path("."), ignore_paths: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Stages whose own inputs (deps, params, command, outputs) differ from dvc.lock, without running
    anything; always-changed stages and deps under ``ignore_paths`` do not count. What a drift-triggered
    retrain asks to tell "a person changed data or code" from "only feedback arrived"."""
    from dvc.repo import Repo

    spec = (yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages", {})
    always = {name for name, st in spec.items() if st.get("always_changed")}
    prefixes = tuple(p.rstrip("/") + "/" for p in ignore_paths)
    with Repo(str(root)) as repo:
        status = repo.status()
    out: dict[str, list[str]] = {}
    for stage, changes in status.items():
        name = stage.split(":")[-1]
        if name in always:
            continue
        items: list[str] = []
        for change in changes:
            if isinstance(change, str):
                items.append(change)
                continue
            for kind, what in change.items():
                if isinstance(what, dict):
                    items += [f"{kind}: {path}" for path in what if not str(path).startswith(prefixes)]
                else:
                    items.append(kind)
        if items:
            out[name] = items
    return out


def push(root: Path = Path(".")) -> int:
    """Push cached outputs to the default remote; returns the number of files transferred."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return int(repo.push() or 0)
