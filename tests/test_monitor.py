"""Evidently drift detection on real traffic logs: in-distribution traffic passes, shifted traffic drifts."""

import json
from pathlib import Path

import pytest

from pipeline.config import MonitorConfig, TaskConfig, load_params
from tests.conftest import ROOT

TASK = load_params(ROOT / "params.yaml").task  # the demo's json task with its category/priority fields



@pytest.fixture
def clean(clean_demo):
    return clean_demo


def _log(path: Path, rows):
    with open(path, "w") as fh:
        for prompt, response in rows:
            fh.write(json.dumps({"prompt": prompt, "response": response}) + "\n")


def test_in_distribution_traffic_does_not_drift(clean, tmp_path):
    from pipeline.monitor.drift import check_drift

    rows = [json.loads(x)["messages"] for x in (clean / "eval/clean.jsonl").read_text().splitlines()]
    _log(tmp_path / "t.jsonl", [(m[0]["content"], m[1]["content"]) for m in rows[:60]])
    r = check_drift(clean / "train/clean.jsonl", tmp_path / "t.jsonl", MonitorConfig(out_dir=str(tmp_path / "r")), TASK)
    assert r["status"] == "ok" and not r["drift"] and r["drift_share"] < 0.5
    assert (tmp_path / "r/drift.html").stat().st_size > 10_000


def test_shifted_traffic_drifts(clean, tmp_path):
    from pipeline.monitor.drift import check_drift

    long_question = "Could you explain in detail how to configure the enterprise single sign on integration " * 3
    _log(tmp_path / "t.jsonl", [(long_question, '{"category": "technical", "priority": "low"}')] * 40)
    r = check_drift(clean / "train/clean.jsonl", tmp_path / "t.jsonl", MonitorConfig(out_dir=str(tmp_path / "r")), TASK)
    assert r["drift"] and r["drifted_columns"] >= 3
    assert set(r["columns"]) == {"prompt_length", "prompt_words", "response_length", "response_words",
                                 "answer_valid", "field.category", "field.priority"}


def test_columns_are_generic_for_a_text_task(clean, tmp_path):
    from pipeline.monitor.drift import check_drift

    rows = [json.loads(x)["messages"] for x in (clean / "eval/clean.jsonl").read_text().splitlines()]
    _log(tmp_path / "t.jsonl", [(m[0]["content"], m[1]["content"]) for m in rows[:40]])
    r = check_drift(clean / "train/clean.jsonl", tmp_path / "t.jsonl", MonitorConfig(out_dir=str(tmp_path / "r")),
                    TaskConfig(kind="text"))
    assert set(r["columns"]) == {"prompt_length", "prompt_words", "response_length", "response_words", "answer_valid"}
    assert r["valid_answer_rate"] == 1.0 and not r["drift"]


def test_too_little_traffic_is_reported_not_judged(clean, tmp_path):
    from pipeline.monitor.drift import check_drift

    _log(tmp_path / "t.jsonl", [("hi", "{}")] * 3)
    r = check_drift(clean / "train/clean.jsonl", tmp_path / "t.jsonl", MonitorConfig(out_dir=str(tmp_path / "r")), TASK)
    assert {k: r[k] for k in ("status", "requests", "min_requests", "drift")} == {
        "status": "insufficient_data", "requests": 3, "min_requests": 20, "drift": False}


def test_corrupt_traffic_log_names_file_and_line(clean, tmp_path):
    from pipeline.monitor.drift import check_drift

    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:2: not a traffic record"):
        check_drift(clean / "train/clean.jsonl", tmp_path / "t.jsonl", MonitorConfig(out_dir=str(tmp_path / "r")), TASK)
