"""Answer kinds: how a task's answers are validated, parsed and scored (``task:`` in params.yaml).

    from pipeline.tasks import build_task
    task = build_task(params.task)
    task.check_reference(answer)            # None, or why the reference is a data defect
    task.score(prediction, reference)       # Score(values={metric: float}, reason=...)

Kinds: json (optional JSON Schema), text (exact match, ROUGE-L, chrF), label (accuracy, macro-F1),
sql (execution accuracy on a read-only SQLite database, normalised exact match), custom (a user scorer).
"""

from __future__ import annotations

from pipeline.config import TaskConfig
from pipeline.tasks.base import Score, Task


def build_task(cfg: TaskConfig) -> Task:
    """The task object for ``cfg``; resources it needs (schema file, database, scorer) are checked here."""
    if cfg.kind == "json":
        from pipeline.tasks.json_answers import JsonTask as cls
    elif cfg.kind == "text":
        from pipeline.tasks.text import TextTask as cls
    elif cfg.kind == "label":
        from pipeline.tasks.label import LabelTask as cls
    elif cfg.kind == "sql":
        from pipeline.tasks.sql import SqlTask as cls
    else:
        from pipeline.tasks.custom import CustomTask as cls
    return cls(cfg)


__all__ = ["Score", "Task", "build_task"]
