"""`pip install .` alone gives a working `loraflow`: the wheel, installed into a fresh virtual environment
with nothing but its declared dependencies (resolved against the lock file, so the test is reproducible),
runs `loraflow sanitize` on a small file outside any project. A package the code imports but pyproject.toml
does not declare fails here at first use, as it would for a user."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, copy_project

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _run(args: list, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_installs_alone_and_sanitizes(tmp_path):
    wheels = tmp_path / "dist"
    src = copy_project(tmp_path / "src")  # a build writes build/ into its source folder: not into the checkout
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".", "-w", wheels], src)
    wheel = next(wheels.glob("loraflow-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path)
    _run([venv / "bin/pip", "install", "-q", wheel, "-c", ROOT / "requirements/pipeline.lock"], tmp_path)

    work = tmp_path / "work"  # no params.yaml, no checkout on sys.path: only what the wheel installed
    work.mkdir()
    (work / "in.jsonl").write_text(
        json.dumps({"prompt": "My card 4111 1111 1111 1111 was charged twice", "completion": "billing"}) + "\n"
        + json.dumps({"prompt": "My card 4111 1111 1111 1111 was charged twice", "completion": "billing"}) + "\n"
        + "not json\n")
    help_text = _run([venv / "bin/loraflow", "sanitize", "--help"], work).stdout
    assert "--out" in help_text
    out = _run([venv / "bin/loraflow", "sanitize", "in.jsonl", "--out", "clean"], work).stdout
    assert "read 3 = kept 1 + quarantined 1 + duplicates 1" in out, out
    kept = [json.loads(line) for line in (work / "clean/clean.jsonl").read_text().splitlines()]
    assert kept[0]["messages"][0]["content"] == "My card <CARD> was charged twice"
    where = _run([venv / "bin/python", "-c", "import pipeline; print(pipeline.__file__)"], work).stdout
    assert str(venv) in where  # the installed package, not the checkout
