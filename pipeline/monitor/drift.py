"""Drift monitoring of served traffic with Evidently, for any task.

Compares the requests in the serving traffic log, and the answers the model gave, with the training data.
Monitored columns are generic: prompt and response length and word count (Evidently text descriptors),
``prompt_novel_words`` (the share of a prompt's words the training prompts never use: a new topic of the
same length shows here and nowhere else), the share of answers the task's parser accepts (``answer_valid``), and categorical answer distributions
only where the task names them: the label for ``label`` tasks, the ``task.fields`` of ``json`` answers.
Drift is declared when the share of drifted columns reaches ``monitor.drift_share``. Writes
``drift.html`` and ``drift.json``.

Each check judges a **window**: the requests logged after the window the previous check judged (its end is
kept in ``<out_dir>/window.json``), capped to the newest ``monitor.window_requests`` and the last
``monitor.window_hours``. A judged window is never judged again, so one burst of drifted traffic fires once.
A window with fewer than ``monitor.min_requests`` requests gets no verdict and stays open for the next check.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import deque
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pipeline.config import MonitorConfig, TaskConfig
from pipeline.io import LogError, LogStats, read_log, write_json
from pipeline.tasks import Task, build_task

TEXT_COLUMNS = ["prompt_length", "prompt_words", "response_length", "response_words"]
NOVELTY = "prompt_novel_words"
_WORD = re.compile(r"[^\W\d_]{3,}")  # letters only: numbers and ids are new in every request


def _words(text: str) -> list[str]:
    return _WORD.findall(str(text).lower())


def add_novelty(reference, current):
    """``prompt_novel_words`` for both frames, measured against the vocabulary of half the training prompts
    (every other row); the reference keeps the other half, so its values are out-of-sample like the
    traffic's, not 0 by construction. Returns the two frames."""
    vocab: set[str] = set()
    for text in reference["prompt"].iloc[::2]:
        vocab.update(_words(text))
    held = reference.iloc[1::2].copy() if len(reference) > 1 else reference.copy()

    def share(text: str) -> float:
        words = _words(text)
        return sum(w not in vocab for w in words) / len(words) if words else 0.0

    held[NOVELTY] = held["prompt"].map(share)
    current = current.copy()
    current[NOVELTY] = current["prompt"].map(share)
    return held, current


def answer_columns(task: Task, answer: str) -> dict[str, str]:
    """The categorical columns of one answer: validity, and whatever the answer kind compares (a label, the
    named JSON fields)."""
    return {"answer_valid": "valid" if task.is_valid(answer) else "invalid", **task.drift_columns(answer)}


def reference_frame(train_file: Path, task: Task):
    import pandas as pd

    rows = []
    with open(train_file, encoding="utf-8") as fh:
        for line in fh:
            msgs = json.loads(line)["messages"]
            answer = msgs[-1]["content"]
            rows.append({"prompt": "\n".join(m["content"] for m in msgs[:-1]), "response": answer,
                         **answer_columns(task, answer)})
    return pd.DataFrame(rows)


def _when(ts: object) -> datetime | None:
    if not isinstance(ts, str):
        return None
    t = datetime.fromisoformat(ts)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def traffic_frame(traffic_log: Path, task: Task, model: str | None = None, after: datetime | None = None,
                  cfg: MonitorConfig | None = None, now: datetime | None = None, stats: LogStats | None = None):
    """Answered requests (status 200, or records without a status) of ``model`` (any when None) in the
    window after ``after``; returns the frame and the window (first/last time, count). One log may hold
    several models served side by side. Records without a time predate windows: only a first check sees them.
    Read by the one log policy (``pipeline.io.read_log``: a torn last line is skipped and counted in
    ``stats``), streamed: only the newest ``monitor.window_requests`` are kept."""
    import pandas as pd

    now = now or datetime.now(timezone.utc)
    oldest = now - timedelta(hours=cfg.window_hours) if cfg and cfg.window_hours else None
    keep = deque(maxlen=cfg.window_requests if cfg and cfg.window_requests else None)
    for path, lineno, rec in read_log(traffic_log, stats):
        try:
            served = rec.get("model", model)
            # Stable names from the gateway; "<model>-v<N>" from direct vLLM calls.
            if rec.get("status", 200) != 200 or (model and served != model
                                                 and not str(served).startswith(f"{model}-v")):
                continue
            when = _when(rec.get("ts"))
            if (after is not None and (when is None or when <= after)) or \
                    (oldest is not None and when is not None and when < oldest):
                continue
            keep.append((when, str(rec["prompt"]), str(rec["response"])))
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise LogError(f"{path}:{lineno}: not a traffic record ({err})") from None
    rows = [{"prompt": p_, "response": r, **answer_columns(task, r)} for _, p_, r in keep]
    known = [t for t, _, _ in keep if t is not None]
    window = {"start": min(known).isoformat() if known else None, "end": max(known).isoformat() if known else None,
              "after": after.isoformat() if after else None, "requests": len(rows)}
    return pd.DataFrame(rows), window


def window_state(out_dir: Path) -> datetime | None:
    """The end of the last judged window (None: nothing judged yet). An unreadable state file is an error,
    never "nothing judged" (that would judge, and maybe fire on, old traffic again)."""
    path = Path(out_dir) / "window.json"
    if not path.is_file():
        return None
    try:
        return _when(json.loads(path.read_text(encoding="utf-8"))["end"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: unreadable drift window state ({err}); fix or delete it (deleting re-judges "
                         "all logged traffic once)") from None


def check_drift(train_file: Path, traffic_log: Path, cfg: MonitorConfig, task_cfg: TaskConfig,
                model: str | None = None, now: datetime | None = None) -> dict:
    import numpy as np
    from evidently import DataDefinition, Dataset, Report
    from evidently.descriptors import TextLength, WordCount
    from evidently.metrics import DriftedColumnsCount
    from evidently.presets import DataDriftPreset

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = build_task(task_cfg)
    # Nothing served yet is no log at all: an empty window (a log that exists but cannot be read raises).
    stats = LogStats()
    current, window = traffic_frame(traffic_log, task, model, window_state(out), cfg, now, stats)
    if len(current) < cfg.min_requests:
        result = {"status": "insufficient_data", "requests": len(current), "min_requests": cfg.min_requests,
                  "drift": False, "window": window, "torn_lines": stats.torn}
        write_json(out / "drift.json", result)
        return result
    reference = reference_frame(train_file, task)
    categorical = [c for c in reference.columns if c not in ("prompt", "response")]
    reference, current = add_novelty(reference, current)
    columns = TEXT_COLUMNS + [NOVELTY] + categorical
    definition = DataDefinition(text_columns=["prompt", "response"], categorical_columns=categorical,
                                numerical_columns=[NOVELTY])
    descriptors = [TextLength("prompt", alias="prompt_length"), WordCount("prompt", alias="prompt_words"),
                   TextLength("response", alias="response_length"), WordCount("response", alias="response_words")]
    ref_ds = Dataset.from_pandas(reference, data_definition=definition, descriptors=descriptors)
    cur_ds = Dataset.from_pandas(current, data_definition=definition, descriptors=descriptors)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        # A constant column (every answer valid) makes Evidently's correlation step divide by zero;
        # the drift test itself handles it, so the warnings are noise in the user's console.
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = Report([DriftedColumnsCount(columns=columns, drift_share=cfg.drift_share),
                           DataDriftPreset(columns=columns)]).run(cur_ds, ref_ds)
    snapshot.save_html(str(out / "drift.html"))
    metrics = snapshot.dict()["metrics"]
    count = next(m["value"] for m in metrics if m["metric_name"].startswith("DriftedColumnsCount"))
    per_column = {}
    for m in metrics:
        name = m["metric_name"]
        if name.startswith("ValueDrift(column="):
            col = name.split("column=")[1].split(",")[0]
            cfg_m = m.get("config") or {}
            threshold = cfg_m.get("threshold")
            method = str(cfg_m.get("method") or "")
            # p-value tests drift below their threshold; distances (Wasserstein, Jensen-Shannon...) above it.
            drifted = threshold is not None and (m["value"] < threshold if "p_value" in method
                                                 else m["value"] >= threshold)
            per_column[col] = {"score": m["value"], "method": method, "threshold": threshold, "drifted": drifted}
    share = float(count["share"])
    result = {
        "status": "ok",
        "requests": len(current),
        "valid_answer_rate": round(float((current["answer_valid"] == "valid").mean()), 4),
        "reference_rows": len(reference),
        "drifted_columns": int(count["count"]),
        "drift_share": round(share, 4),
        "threshold": cfg.drift_share,
        "drift": share >= cfg.drift_share,
        "columns": per_column,
        "drifted": sorted(c for c, v in per_column.items() if v["drifted"]),
        "window": window,
        "torn_lines": stats.torn,
        "html": str(out / "drift.html"),
    }
    write_json(out / "drift.json", result)
    # Not judged yet: the caller commits the window (``commit_window``) once what the verdict triggers is
    # out (the MLflow run and the drift event), so a failure on the way re-judges it, never loses it.
    result["window_end"] = window["end"] or (now or datetime.now(timezone.utc)).isoformat()
    return result


def window_id(model: str | None, result: dict) -> str:
    """A stable id of the window a check judged: the model and where the window starts (the end of the
    last committed one). A window judged again after a failure, with more traffic in it, keeps its id, so
    the drift event it sends again is the same event to its consumers (Prefect acts on an event id once)."""
    return f"{model or '*'}:after={result['window'].get('after')}"


def commit_window(out_dir: Path, result: dict) -> None:
    """Mark ``result``'s window judged: the next check starts after it (records without a time are behind
    us too). Call it only after the verdict's consequences are recorded and sent. Written whole (a
    temporary file renamed), so a crash leaves the old state or the new one."""
    path = Path(out_dir) / "window.json"
    tmp = path.with_suffix(".tmp")
    write_json(tmp, {"end": result["window_end"], "requests": result["requests"], "drift": result["drift"]})
    os.replace(tmp, path)
