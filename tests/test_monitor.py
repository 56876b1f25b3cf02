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
    assert r["status"] == "ok" and not r["drift"] and r["drift_share"] < 0.35, r["drifted"]
    assert (tmp_path / "r/drift.html").stat().st_size > 10_000


def test_shifted_traffic_drifts(clean, tmp_path):
    from pipeline.monitor.drift import check_drift

    long_question = "Could you explain in detail how to configure the enterprise single sign on integration " * 3
    _log(tmp_path / "t.jsonl", [(long_question, '{"category": "technical", "priority": "low"}')] * 40)
    r = check_drift(clean / "train/clean.jsonl", tmp_path / "t.jsonl", MonitorConfig(out_dir=str(tmp_path / "r")), TASK)
    assert r["drift"] and r["drifted_columns"] >= 3
    assert set(r["columns"]) == {"prompt_length", "prompt_words", "response_length", "response_words",
                                 "prompt_novel_words", "answer_valid", "field.category", "field.priority"}


def test_a_new_topic_of_the_same_length_drifts_on_novel_words(clean, tmp_path):
    """Feature requests written like the training tickets (same greetings, details, length): only the
    words are new. The answers are in-distribution labels, so what fires is the prompts' novel-word share."""
    from pipeline.monitor.drift import check_drift

    rows = [json.loads(x)["messages"] for x in (ROOT / "data/drift/feature_requests.jsonl").read_text().splitlines()]
    _log(tmp_path / "t.jsonl", [(m[0]["content"], '{"category": "technical", "priority": "low"}') for m in rows[:80]])
    r = check_drift(clean / "train/clean.jsonl", tmp_path / "t.jsonl", MonitorConfig(out_dir=str(tmp_path / "r")), TASK)
    assert "prompt_novel_words" in r["drifted"], r["columns"]
    assert not {"prompt_length", "prompt_words"} & set(r["drifted"]), r["drifted"]


def test_columns_are_generic_for_a_text_task(clean, tmp_path):
    from pipeline.monitor.drift import check_drift

    rows = [json.loads(x)["messages"] for x in (clean / "eval/clean.jsonl").read_text().splitlines()]
    _log(tmp_path / "t.jsonl", [(m[0]["content"], m[1]["content"]) for m in rows[:40]])
    r = check_drift(clean / "train/clean.jsonl", tmp_path / "t.jsonl", MonitorConfig(out_dir=str(tmp_path / "r")),
                    TaskConfig(kind="text"))
    assert set(r["columns"]) == {"prompt_length", "prompt_words", "response_length", "response_words",
                                 "prompt_novel_words", "answer_valid"}
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
    with pytest.raises(ValueError, match=r"t\.jsonl:2: not a JSON record"):
        check_drift(clean / "train/clean.jsonl", tmp_path / "t.jsonl", MonitorConfig(out_dir=str(tmp_path / "r")), TASK)


def _timed_log(path: Path, rows, start_s: int):
    from datetime import datetime, timedelta, timezone

    t0 = datetime(2026, 12, 1, tzinfo=timezone.utc)
    with open(path, "a") as fh:
        for i, (prompt, response) in enumerate(rows):
            fh.write(json.dumps({"ts": (t0 + timedelta(seconds=start_s + i)).isoformat(), "model": "m",
                                 "status": 200, "prompt": prompt, "response": response}) + "\n")


def test_a_judged_window_never_fires_again_and_the_next_holds_only_new_requests(clean, tmp_path):
    from datetime import datetime, timezone

    from pipeline.monitor.drift import check_drift, commit_window

    cfg = MonitorConfig(out_dir=str(tmp_path / "r"))
    shifted = [("Could you explain in detail how to configure the enterprise single sign on " * 3,
                '{"category": "technical", "priority": "low"}')] * 30
    now = datetime(2026, 12, 2, tzinfo=timezone.utc)
    _timed_log(tmp_path / "t.jsonl", shifted, 0)
    first = check_drift(clean / "train/clean.jsonl", tmp_path / "t.jsonl", cfg, TASK, "m", now=now)
    assert first["drift"] and first["window"]["requests"] == 30 and first["window"]["after"] is None
    assert "prompt_length" in first["drifted"]
    # Judged only once committed (the flow commits after the run is logged and the event is out).
    assert check_drift(clean / "train/clean.jsonl", tmp_path / "t.jsonl", cfg, TASK, "m", now=now)["requests"] == 30
    commit_window(cfg.out_dir, first)
    again = check_drift(clean / "train/clean.jsonl", tmp_path / "t.jsonl", cfg, TASK, "m", now=now)
    assert again["status"] == "insufficient_data" and again["requests"] == 0 and not again["drift"]
    rows = [json.loads(x)["messages"] for x in (clean / "eval/clean.jsonl").read_text().splitlines()]
    _timed_log(tmp_path / "t.jsonl", [(m[0]["content"], m[1]["content"]) for m in rows[:40]], 1000)
    third = check_drift(clean / "train/clean.jsonl", tmp_path / "t.jsonl", cfg, TASK, "m", now=now)
    commit_window(cfg.out_dir, third)
    assert third["window"]["requests"] == 40 and third["window"]["after"] == first["window"]["end"]
    assert not third["drift"]  # only the new, in-distribution requests were judged


def test_window_caps_by_count_and_age(clean, tmp_path):
    from datetime import datetime, timezone

    from pipeline.monitor.drift import check_drift

    rows = [json.loads(x)["messages"] for x in (clean / "eval/clean.jsonl").read_text().splitlines()]
    _timed_log(tmp_path / "t.jsonl", [(m[0]["content"], m[1]["content"]) for m in rows[:60]], 0)
    now = datetime(2026, 12, 1, 0, 1, tzinfo=timezone.utc)  # 60 s after the first record
    r = check_drift(clean / "train/clean.jsonl", tmp_path / "t.jsonl",
                    MonitorConfig(out_dir=str(tmp_path / "a"), window_requests=25), TASK, "m", now=now)
    assert r["window"]["requests"] == 25 and r["window"]["start"].endswith("00:00:35+00:00")
    r = check_drift(clean / "train/clean.jsonl", tmp_path / "t.jsonl",
                    MonitorConfig(out_dir=str(tmp_path / "b"), window_hours=30 / 3600), TASK, "m", now=now)
    assert r["requests"] == 30  # records 30 s .. 59 s after the first, i.e. at most 30 s old


def test_unreadable_window_state_is_an_error_not_a_fresh_start(clean, tmp_path):
    from pipeline.monitor.drift import check_drift

    _timed_log(tmp_path / "t.jsonl", [("hi", "{}")] * 3, 0)
    (tmp_path / "r").mkdir()
    (tmp_path / "r/window.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"window\.json: unreadable drift window state"):
        check_drift(clean / "train/clean.jsonl", tmp_path / "t.jsonl", MonitorConfig(out_dir=str(tmp_path / "r")), TASK)


def test_a_drift_trigger_comes_back_when_logging_or_sending_it_failed(clean, project, prefect_server, monkeypatch):
    """The drift-check flow against a real Prefect server: MLflow down on the first check, so neither the
    run nor the event went out; the window stays open and the next check sends the trigger (the window was
    marked judged first, so that burst never retrained). Sending to a server that is not there raises
    within its timeout instead of being dropped by Prefect's background worker."""
    import uuid
    from datetime import datetime, timezone

    import httpx
    import yaml
    from prefect.settings import PREFECT_API_URL

    from flows.monitor import drift_check, send_event
    from pipeline.monitor.drift import window_state

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    aug = project / "data/augmented"
    aug.mkdir(parents=True, exist_ok=True)
    (aug / "train.jsonl").write_bytes((clean / "train/clean.jsonl").read_bytes())
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["augment"]["out_dir"] = "data/augmented"
    raw["project"]["name"] = "m"  # the model _timed_log's requests went to
    raw["serve"]["traffic_log"] = "serving/requests.jsonl"
    raw["registry"]["tracking_uri"] = "http://127.0.0.1:9"  # MLflow is down
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    (project / "serving").mkdir()
    shifted = [("Could you explain in detail how to configure the enterprise single sign on " * 3,
                '{"category": "technical", "priority": "low"}')] * 30
    _timed_log(project / "serving/requests.jsonl", shifted, 0)
    name = raw["project"]["name"]
    with pytest.raises(Exception):
        drift_check(params_file="params.yaml")
    assert window_state(project / raw["monitor"]["out_dir"]) is None  # still open: judged again next time
    raw["registry"]["tracking_uri"] = f"sqlite:///{project}/mlflow/mlflow.db"
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    result = drift_check(params_file="params.yaml")
    assert result["drift"] and result["window"]["requests"] == 30 and result["window"]["after"] is None
    assert window_state(project / raw["monitor"]["out_dir"]) is not None
    api = PREFECT_API_URL.value()
    deadline, found = datetime.now(timezone.utc).timestamp() + 30, []
    while not found and datetime.now(timezone.utc).timestamp() < deadline:
        events = httpx.post(f"{api}/events/filter", json={"filter": {"event": {"name": ["loraflow.drift.detected"]},
                                                                     "occurred": {"since": "2020-01-01T00:00:00Z"}}},
                            timeout=10).json()["events"]
        found = [e for e in events if e["payload"].get("window_id") == result["window_id"]]
    assert found and found[0]["resource"]["prefect.resource.id"] == f"mlflow.model.{name}"
    monkeypatch.setattr(PREFECT_API_URL, "value", lambda: "http://127.0.0.1:9/api")
    with pytest.raises(Exception):
        send_event("loraflow.drift.detected", {"prefect.resource.id": "x"}, {}, uuid.uuid4(), timeout_s=20)
