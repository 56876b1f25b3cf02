"""Sanitize on a real Dask cluster (2 local worker processes) gives exactly the local run's outputs.

The corpus is the demo's tickets plus planted trouble placed so that the first and later copies fall in
different shards: exact and near duplicates, label conflicts, eval records contaminated by train, defects,
PII, a CSV input (a whole-file shard) and a validation carve.
"""

import json
import random
import time
from pathlib import Path

import pytest

from pipeline.config import ClusterConfig, SanitizeConfig
from pipeline.data.engine import DaskEngine, EngineError
from pipeline.data.sanitize import new_index, sanitize_files
from pipeline.tasks import build_task
from pipeline.config import TaskConfig

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


def _chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def _records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and len(rec.get("messages") or []) == 2:
            try:
                json.loads(rec["messages"][1]["content"])
            except (json.JSONDecodeError, TypeError, KeyError):
                continue
            out.append(rec)
    return out


def _corpus(tmp: Path) -> tuple[list[Path], list[Path]]:
    rng = random.Random(7)
    raw = (ROOT / "data/raw/tickets_train.jsonl").read_bytes()
    base = _records(ROOT / "data/raw/tickets_train.jsonl")
    lines = raw.decode("utf-8", errors="replace").splitlines()  # the demo's own defects included
    planted = []
    for r in rng.sample(base, 30):  # exact copies, later in the file (other shards)
        planted.append(json.dumps(r, ensure_ascii=False))
    for r in rng.sample(base, 30):  # near copies: a word added at the end
        m = json.loads(json.dumps(r))
        m["messages"][0]["content"] += " Thanks"
        planted.append(json.dumps(m, ensure_ascii=False))
    for r in rng.sample(base, 10):  # the same prompt with another answer: label conflicts across shards
        m = json.loads(json.dumps(r))
        ans = json.loads(m["messages"][-1]["content"])
        ans["priority"] = "high" if ans.get("priority") != "high" else "low"
        m["messages"][-1]["content"] = json.dumps(ans)
        planted.append(json.dumps(m, ensure_ascii=False))
    planted += ['{"messages": [', "", "not json", json.dumps({"messages": []}),
                json.dumps(_chat("Please call Jane Doe at +1 415 555 0134 or jane.doe@example.com", "not json")),
                json.dumps(_chat("Refund please, my card is 4111 1111 1111 1111 and email bob@example.org",
                                 '{"category": "billing", "priority": "high"}'))]
    rng.shuffle(planted)
    for item in planted:  # spread through the second half so first copies and repeats sit in other shards
        lines.insert(rng.randrange(len(lines) // 2, len(lines)), item)
    train = tmp / "train.jsonl"
    train.write_text("\n".join(lines) + "\n", encoding="utf-8")
    extra = tmp / "extra.csv"  # another format: one whole-file shard; repeats of train records
    rows = ["prompt,completion"] + [
        '"{}","{}"'.format(r["messages"][0]["content"].replace('"', '""'),
                           r["messages"][1]["content"].replace('"', '""')) for r in base[:15]]
    extra.write_text("\n".join(rows) + "\n", encoding="utf-8")
    ev_lines = (ROOT / "data/raw/tickets_eval.jsonl").read_text(encoding="utf-8", errors="replace").splitlines()
    ev_lines += [json.dumps(r) for r in rng.sample(base, 12)]
    rng.shuffle(ev_lines)
    evf = tmp / "eval.jsonl"
    evf.write_text("\n".join(ev_lines) + "\n", encoding="utf-8")
    return [train, extra], [evf]


def _run(tmp: Path, name: str, train, ev, cfg: SanitizeConfig, engine) -> Path:
    out = tmp / name
    task = build_task(TaskConfig(kind="json", fields=["category", "priority"]))
    index = new_index(cfg)
    sanitize_files(train, out / "train", cfg, task=task, index=index, validation_fraction=0.2, engine=engine)
    sanitize_files(ev, out / "eval", cfg, task=task, reference=index, engine=engine)
    return out


def _report(path: Path) -> dict:
    r = json.loads(path.read_text())
    r.pop("seconds")
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dask")
    train, ev = _corpus(tmp)
    cfg = SanitizeConfig(columns={"prompt": "prompt", "completion": "completion"},
                         engine="dask", cluster=ClusterConfig(workers=2, shard_mb=0.04, memory_limit="2GiB"))
    local = _run(tmp, "local", train, ev, cfg, None)
    with DaskEngine.open(cfg) as engine:
        dask = _run(tmp, "dask", train, ev, cfg, engine)
    return local, dask, train


def test_outputs_are_identical_to_the_local_run(runs):
    local, dask, _ = runs
    for split in ("train", "eval"):
        for name in ("clean.jsonl", "validation.jsonl", "quarantine.jsonl", "data_card.md", "pii_digests.txt"):
            a, b = local / split / name, dask / split / name
            assert a.read_bytes() == b.read_bytes(), f"{split}/{name} differs"
        ra, rb = _report(local / split / "report.json"), _report(dask / split / "report.json")
        assert ra.pop("engine") == {"name": "local", "workers": 1, "shards": 1}
        engine = rb.pop("engine")
        assert ra == rb
        assert engine["name"] == "dask" and engine["workers"] == 2
    train = json.loads((dask / "train/report.json").read_text())
    assert train["engine"]["shards"] >= 8  # the JSONL cut into many shards, plus the CSV
    assert train["engine"]["shuffle_bytes"] > 0 and 0 < train["engine"]["worker_peak_rss_mb"] < 2048


def test_the_planted_trouble_was_found_across_shards(runs):
    _, dask, _ = runs
    train = json.loads((dask / "train/report.json").read_text())
    ev = json.loads((dask / "eval/report.json").read_text())
    assert train["reconciles"] and ev["reconciles"]
    assert train["duplicates"]["exact"] >= 30 + 15 and train["duplicates"]["near"] >= 20
    assert train["quarantined"]["by_reason"]["label_conflict"] >= 20  # each later copy and its first
    assert ev["duplicates"]["contamination"] >= 12
    assert train["validation"] > 0 and train["redactions"]["total"] > 0
    q = [json.loads(x) for x in (dask / "train/quarantine.jsonl").read_text().splitlines()]
    conflicts = [e for e in q if e["reason"] == "label_conflict"]
    assert all(e["raw"] for e in conflicts)  # the worker re-read each one's line, redacted
    text = (dask / "train/quarantine.jsonl").read_text() + (dask / "train/clean.jsonl").read_text()
    assert "4111 1111 1111 1111" not in text and "jane.doe@example.com" not in text


def test_an_unreachable_scheduler_is_a_clear_error_in_bounded_time():
    cfg = SanitizeConfig(engine="dask", cluster=ClusterConfig(address="tcp://127.0.0.1:9", connect_timeout_s=2))
    started = time.monotonic()
    with pytest.raises(EngineError, match="sanitize.cluster.address"):
        with DaskEngine.open(cfg):
            pass
    assert time.monotonic() - started < 30


def test_ray_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="engine.*Dask"):
        SanitizeConfig(engine="ray")


def test_a_worker_killed_mid_run_changes_nothing_in_the_outputs(runs, tmp_path):
    """A worker process dies (SIGKILL) after the first shard came back: Dask's nanny starts a new one, the
    shards it held run again, and the outputs are still the local run's, byte for byte."""
    import os
    import signal

    local, _, train = runs  # the same input paths: the clean records name their source file
    cfg = SanitizeConfig(columns={"prompt": "prompt", "completion": "completion"}, engine="dask",
                         cluster=ClusterConfig(workers=2, shard_mb=0.02, memory_limit="2GiB"))
    task = build_task(TaskConfig(kind="json", fields=["category", "priority"]))
    killed: list[int] = []
    with DaskEngine.open(cfg) as engine:
        def progress(msg: str) -> None:
            if not killed and "shard 1/" in msg:
                pid = sorted(engine.client.run(os.getpid).values())[0]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        report = sanitize_files(train, tmp_path / "out", cfg, task=task, index=new_index(cfg),
                                validation_fraction=0.2, engine=engine, progress=progress)
    assert killed and report["engine"]["shards"] >= 15
    for name in ("clean.jsonl", "validation.jsonl", "quarantine.jsonl"):
        assert (tmp_path / "out" / name).read_bytes() == (local / "train" / name).read_bytes(), name


def test_a_shard_past_its_deadline_stops_the_stage_naming_the_setting(tmp_path):
    train, _ = _corpus(tmp_path)
    cfg = SanitizeConfig(columns={"prompt": "prompt", "completion": "completion"}, engine="dask",
                         cluster=ClusterConfig(workers=1, shard_mb=1, shard_timeout_s=0.001))
    with DaskEngine.open(cfg) as engine:
        with pytest.raises(EngineError, match="shard_timeout_s"):
            sanitize_files(train, tmp_path / "out", cfg, engine=engine)
        assert not engine.client.processing() or not any(engine.client.processing().values())
