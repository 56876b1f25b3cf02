"""Answer kinds: how a task's answers are validated, parsed and scored (``task:`` in params.yaml).

    from pipeline.tasks import build_task
    task = build_task(params.task)
    task.check_reference(answer)            # None, or why the reference is a data defect
    task.score(prediction, reference)       # Score(values={metric: float}, reason=...)

One kind is one module: a ``Task`` subclass decorated with ``@register`` that declares its metrics, its
primary metric, the settings and files it reads, and implements its parser and scorer. Every module in
this package is a kind (json, text, label, sql, custom); kinds from other packages register through the
entry-point group ``loraflow.tasks``. Config validation asks this registry (README, "A new answer kind").
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from pathlib import Path

from pipeline.tasks.base import KIND_SETTINGS, Score, Task

_KINDS: dict[str, type[Task]] = {}
_LOADED = False
ENTRY_POINT_GROUP = "loraflow.tasks"
_NOT_KINDS = {"base"}  # modules of this package that hold shared code, not a kind


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` the answer kind named ``cls.kind``."""
    if not cls.kind:
        raise TypeError(f"{cls.__name__}: set the class attribute kind")
    if cls.kind in _KINDS and _KINDS[cls.kind] is not cls:
        raise TypeError(f"answer kind {cls.kind!r} registered twice ({_KINDS[cls.kind].__name__}, {cls.__name__})")
    fixed_primary = cls.primary_metric.__func__ is Task.primary_metric.__func__  # not computed from the config
    if fixed_primary and cls.primary not in cls.metrics_per_example + cls.aggregate_metrics:
        raise TypeError(f"{cls.__name__}: primary metric {cls.primary!r} is not one of its metrics")
    _KINDS[cls.kind] = cls
    return cls


def kinds() -> dict[str, type[Task]]:
    """Every registered kind by name: this package's modules, then the ``loraflow.tasks`` entry points."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
            if mod.name not in _NOT_KINDS:
                importlib.import_module(f"{__name__}.{mod.name}")
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            ep.load()  # importing the module runs its @register
    return dict(_KINDS)


def kind_class(kind: str) -> type[Task]:
    known = kinds()
    if kind not in known:
        raise ValueError(f"task.kind: unknown answer kind {kind!r} (known: {', '.join(sorted(known))})")
    return known[kind]


def check_task_config(cfg) -> None:
    """The kind's own checks, and no setting of another kind left in (it would be silently ignored)."""
    cls = kind_class(cfg.kind)
    for key in KIND_SETTINGS:
        if key not in cls.settings and getattr(cfg, key) not in (None, "", []):
            users = sorted(k for k, c in kinds().items() if key in c.settings)
            raise ValueError(f"task.{key}: only used with kind {' or '.join(users)} (task.kind is {cfg.kind})")
    cls.check_config(cfg)


def build_task(cfg) -> Task:
    """The task object for ``cfg``; resources it needs (schema file, database, scorer) are checked here."""
    return kind_class(cfg.kind)(cfg)


__all__ = ["Score", "Task", "build_task", "check_task_config", "kind_class", "kinds", "register"]
