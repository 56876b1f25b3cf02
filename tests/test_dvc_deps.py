"""dvc.yaml declares what changes each stage's results: editing any of it makes DVC re-run that stage.

One real `dvc repro` of the whole DAG in a copy of the project (a pretrained base given as a local folder,
so this also runs the reference-not-copy path through train and evaluate; a few training steps), then each
dependency is edited in turn and `dvc status` must name the stages that would re-run, and only those the
rule says (a pretrained base is not rebuilt for new training data).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_project

pytestmark = pytest.mark.timeout(900)
ALL = {"task", "curate", "sanitize", "base_inputs", "base", "augment", "train", "evaluate"}
ALWAYS = {"task", "curate"}  # always_changed: DVC lists them; they re-hash the task's files / read the live logs


def _dvc(root: Path, *args: str) -> str:
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _stale(root: Path) -> set[str]:
    return {name.split(":")[-1] for name in json.loads(_dvc(root, "status", "--json") or "{}")}


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, tiny_base) -> Path:
    root = copy_project(tmp_path_factory.mktemp("dvc-deps") / "project")
    (root / "task_schema.json").write_text(json.dumps(
        {"type": "object", "required": ["category", "priority"],
         "properties": {"category": {"type": "string"}, "priority": {"type": "string"}}}))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["task"]["json_schema"] = "task_schema.json"
    params["base"]["model"] = str(tiny_base)  # a "pretrained" model in a local folder
    params["train"]["trl"].update(max_steps=2, per_device_train_batch_size=4, save_steps=50)
    params["evaluate"]["max_examples"] = 4
    params["probes"].update(canaries=1, candidates=10)
    params["dvc"]["push"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _dvc(root, "repro")
    assert _stale(root) == ALWAYS
    return root


@pytest.mark.parametrize("path, stages", [
    ("pipeline/config.py", ALL),
    ("pipeline/stages.py", ALL),
    ("pipeline/layout.py", ALL),
    ("pipeline/io.py", ALL),
    ("pipeline/tasks/json_answers.py", {"task", "curate", "sanitize", "evaluate"}),
    ("pipeline/curate/__init__.py", {"curate"}),
    ("pipeline/pii/context.py", {"sanitize", "augment", "evaluate"}),
    ("pipeline/dedup.py", {"sanitize", "augment"}),
    ("pipeline/base/builtin.py", {"base"}),
    ("pipeline/modeling.py", {"base", "train", "evaluate"}),
    ("pipeline/train/trainer.py", {"train"}),
    ("pipeline/train/trl_args.py", {"train"}),
    ("pipeline/evaluate/scoring.py", {"evaluate"}),
])
def test_editing_code_makes_its_stages_stale(reproduced, path, stages):
    f = reproduced / path
    original = f.read_bytes()
    try:
        f.write_bytes(original + b"\n# edited\n")
        assert _stale(reproduced) - ALWAYS == stages - ALWAYS
    finally:
        f.write_bytes(original)
    assert _stale(reproduced) == ALWAYS


def test_editing_the_schema_file_rescores(reproduced):
    schema = reproduced / "task_schema.json"
    original = schema.read_text()
    try:
        schema.write_text(original.replace('"string"}}', '"string", "maxLength": 40}}'))
        _dvc(reproduced, "repro", "--single-item", "task")
        assert json.loads((reproduced / "artifacts/task.json").read_text())["files"]["task_schema.json"]
        assert _stale(reproduced) >= {"sanitize", "evaluate"}
    finally:
        schema.write_text(original)
        _dvc(reproduced, "repro", "--single-item", "task")
    assert _stale(reproduced) == ALWAYS


def test_new_training_data_leaves_a_pretrained_base_alone(reproduced):
    raw = reproduced / "data/raw/tickets_train.jsonl"
    original = raw.read_bytes()
    try:
        new = {"messages": [{"role": "user", "content": "Quarterly invoice 7781 lists a seat we cancelled in May."},
                            {"role": "assistant", "content": '{"category": "billing", "priority": "low"}'}]}
        raw.write_bytes(original + json.dumps(new).encode() + b"\n")
        assert {"sanitize"} <= _stale(reproduced)
        _dvc(reproduced, "repro", "--single-item", "sanitize")
        _dvc(reproduced, "repro", "--single-item", "base_inputs")
        stale = _stale(reproduced)
        assert "base" not in stale and "augment" in stale, stale  # train follows once augment re-ran
        assert json.loads((reproduced / "artifacts/base_inputs.json").read_text())["inputs"] == {}
        # The base output is a reference, not a copy of the weights.
        ref = json.loads((reproduced / "artifacts/base/base.json").read_text())
        assert ref["path"] and ref["weights_sha256"] and not list((reproduced / "artifacts/base").glob("*.safetensors"))
    finally:
        raw.write_bytes(original)


def test_curated_records_retrain_the_adapter_not_the_base(reproduced):
    """A new cut of curated records re-runs sanitize and what follows, but never the embedded base's inputs:
    learning from feedback swaps an adapter, it does not rebuild (and restart serving on) a base."""
    curated = reproduced / "data/curated/train.jsonl"
    original = curated.read_bytes()
    try:
        rec = {"messages": [{"role": "user", "content": "Please add a dark mode to the dashboard."},
                            {"role": "assistant", "content": '{"category": "technical", "priority": "low"}'}],
               "provenance": {"request_id": "chatcmpl-1", "feedback": "correction"}}
        curated.write_bytes(original + json.dumps(rec).encode() + b"\n")
        assert {"sanitize"} <= _stale(reproduced)
        _dvc(reproduced, "repro", "--single-item", "sanitize")
        assert json.loads((reproduced / "data/clean/curated/report.json").read_text())["kept"] == 1
        _dvc(reproduced, "repro", "--single-item", "base_inputs")
        stale = _stale(reproduced)
        assert "base" not in stale and "augment" in stale, stale
    finally:
        curated.write_bytes(original)


def test_scorer_module_database_and_schema_are_the_tasks_resources(tmp_path, monkeypatch):
    from pipeline.config import TaskConfig
    from pipeline.tasks import kind_class

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "my_scorer.py").write_text("def score(p, r, q):\n    return {'hit': float(p == r)}\n")
    (tmp_path / "db.sqlite").write_bytes(b"")
    (tmp_path / "s.json").write_text("{}")
    custom = TaskConfig(kind="custom", scorer="my_scorer:score", metrics=["hit"])
    assert [p.resolve() for p in kind_class("custom").resources(custom)] == [(tmp_path / "my_scorer.py").resolve()]
    assert kind_class("sql").resources(TaskConfig(kind="sql", database="db.sqlite")) == [Path("db.sqlite")]
    assert kind_class("json").resources(TaskConfig(kind="json", json_schema="s.json")) == [Path("s.json")]
    assert kind_class("json").resources(TaskConfig(kind="json", json_schema={"type": "object"})) == []
