"""Shared fixtures: a throw-away copy of the project, a Prefect test server, a tiny base model."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Keep tests away from the developer's own Prefect home and from any network telemetry.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    return [f for f in out if (ROOT / f).is_file()]


def copy_project(dst: Path) -> Path:
    """The project as a fresh clone would have it: tracked files only, in its own git repo."""
    for rel in tracked_files():
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dst, check=True)
    subprocess.run(["git", "commit", "-qm", "copy"], cwd=dst, check=True, env=env)
    return dst


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    dst = copy_project(tmp_path / "project")
    monkeypatch.chdir(dst)
    return dst


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A 1-layer, hidden-64 Llama with the project's tokenizer, built from the committed demo data."""
    from pipeline.base.builtin import build_builtin
    from pipeline.config import BuiltinBaseConfig

    out = tmp_path_factory.mktemp("tiny-base")
    cfg = BuiltinBaseConfig(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=1, vocab_size=512,
                            pretrain_steps=0, copy_circuit=False, output_scale=1.0, rope_theta=10000.0)
    return build_builtin(cfg, [ROOT / "data/raw/tickets_train.jsonl"], out)


@pytest.fixture(scope="session")
def clean_demo(tmp_path_factory) -> Path:
    """The committed demo data sanitized with default settings: ``<dir>/{train,eval}/clean.jsonl``."""
    from pipeline.config import SanitizeConfig
    from pipeline.data.sanitize import sanitize_files

    d = tmp_path_factory.mktemp("clean-demo")
    for split in ("train", "eval"):
        sanitize_files([ROOT / f"data/raw/tickets_{split}.jsonl"], d / split, SanitizeConfig())
    return d


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc, output, timeout_s: float = 120) -> None:
    """Until ``url``/health answers 200; fails with ``output()`` if ``proc`` dies or time runs out."""
    import time

    import httpx

    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.time() < deadline and proc.poll() is None, output()
        time.sleep(1)


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on localhost with a SQLite store (webhooks to private addresses allowed);
    yields its URI and the artifact root."""
    import sys

    port = _free_port()
    env = {**os.environ, "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true", "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https"}
    log = tmp_path / "mlflow-server.log"
    art = tmp_path / "mlflow-artifacts"
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
                             f"sqlite:///{tmp_path}/mlflow-server.db", "--default-artifact-root", str(art),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(uri, proc, lambda: log.read_text()[-2000:])
        yield uri, art
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def release_params(tmp_path: Path, tiny_base: Path, clean_demo: Path, mlflow_server, **sections):
    """Params of model `m` for the release path, run from ``tmp_path``: the tiny base, the sanitized demo
    data as the augmented training file, a real MLflow server; ``sections`` update train/serve/...."""
    from pipeline.config import Params

    uri, art = mlflow_server
    aug = tmp_path / "augmented"
    aug.mkdir(exist_ok=True)
    (aug / "train.jsonl").write_bytes((clean_demo / "train" / "clean.jsonl").read_bytes())
    raw = {"project": {"name": "m"}, "base": {"out_dir": str(tiny_base)}, "sanitize": {"out_dir": str(clean_demo)},
           "augment": {"out_dir": str(aug)}, "train": {"out_dir": str(tmp_path / "adapter")},
           "evaluate": {"out_dir": str(tmp_path / "eval"), "max_examples": 40},
           "registry": {"tracking_uri": uri, "artifact_root": str(art)},
           "serve": {"adapters_dir": str(tmp_path / "served")}}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    return Params(**raw)
