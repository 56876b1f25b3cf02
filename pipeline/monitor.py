"""Drift monitoring of served traffic with Evidently.

Compares the requests in the serving traffic log (and the answers the model gave) against the training
data: prompt length and word count (Evidently text descriptors) and the predicted ``category`` and
``priority`` against the training labels. Drift is declared when the share of drifted columns reaches
``monitor.drift_share``. Writes ``drift.html`` and ``drift.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import MonitorConfig
from pipeline.jsonio import write_json

COLUMNS = ["prompt_length", "prompt_words", "category", "priority"]


def _label_fields(answer: str) -> tuple[str, str]:
    try:
        obj = json.loads(answer)
    except (json.JSONDecodeError, ValueError):
        return "<invalid>", "<invalid>"
    if not isinstance(obj, dict):
        return "<invalid>", "<invalid>"
    return str(obj.get("category", "<missing>")), str(obj.get("priority", "<missing>"))


def reference_frame(train_file: Path):
    import pandas as pd

    rows = []
    with open(train_file, encoding="utf-8") as fh:
        for line in fh:
            msgs = json.loads(line)["messages"]
            cat, pri = _label_fields(msgs[-1]["content"])
            rows.append({"prompt": "\n".join(m["content"] for m in msgs[:-1]), "category": cat, "priority": pri})
    return pd.DataFrame(rows)


def traffic_frame(traffic_log: Path):
    import pandas as pd

    rows = []
    with open(traffic_log, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            try:
                rec = json.loads(line)
                cat, pri = _label_fields(rec["response"])
                rows.append({"prompt": rec["prompt"], "category": cat, "priority": pri})
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{traffic_log}:{lineno}: not a traffic record ({err})") from None
    return pd.DataFrame(rows)


def check_drift(train_file: Path, traffic_log: Path, cfg: MonitorConfig) -> dict:
    from evidently import DataDefinition, Dataset, Report
    from evidently.descriptors import TextLength, WordCount
    from evidently.metrics import DriftedColumnsCount
    from evidently.presets import DataDriftPreset

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not traffic_log.is_file():
        raise FileNotFoundError(f"{traffic_log}: no served traffic logged yet")
    current = traffic_frame(traffic_log)
    if len(current) < cfg.min_requests:
        result = {"status": "insufficient_data", "requests": len(current), "min_requests": cfg.min_requests,
                  "drift": False}
        write_json(out / "drift.json", result)
        return result
    reference = reference_frame(train_file)
    definition = DataDefinition(text_columns=["prompt"], categorical_columns=["category", "priority"])
    descriptors = [TextLength("prompt", alias="prompt_length"), WordCount("prompt", alias="prompt_words")]
    ref_ds = Dataset.from_pandas(reference, data_definition=definition, descriptors=descriptors)
    cur_ds = Dataset.from_pandas(current, data_definition=definition, descriptors=descriptors)
    snapshot = Report([DriftedColumnsCount(columns=COLUMNS, drift_share=cfg.drift_share),
                       DataDriftPreset(columns=COLUMNS)]).run(cur_ds, ref_ds)
    snapshot.save_html(str(out / "drift.html"))
    metrics = snapshot.dict()["metrics"]
    count = next(m["value"] for m in metrics if m["metric_name"].startswith("DriftedColumnsCount"))
    per_column = {}
    for m in metrics:
        name = m["metric_name"]
        if name.startswith("ValueDrift(column="):
            col = name.split("column=")[1].split(",")[0]
            per_column[col] = {"p_value": m["value"], "method": m["config"].get("method")}
    share = float(count["share"])
    result = {
        "status": "ok",
        "requests": len(current),
        "reference_rows": len(reference),
        "drifted_columns": int(count["count"]),
        "drift_share": round(share, 4),
        "threshold": cfg.drift_share,
        "drift": share >= cfg.drift_share,
        "columns": per_column,
        "html": str(out / "drift.html"),
    }
    write_json(out / "drift.json", result)
    return result
