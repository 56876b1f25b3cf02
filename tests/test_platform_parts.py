"""The platform's parts against real processes, sockets and a real Prefect server (no mocks): the supervisor's
failure modes, secrets, the PostgreSQL URL split, Prefect settings resolution, the retrain limit."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time

import psutil
import pytest

from pipeline.platform import supervisor
from pipeline.platform.services import Service, database_urls, load_secrets, redact_url

PY = sys.executable


def test_a_taken_port_names_the_process_holding_it(tmp_path):
    holder = subprocess.Popen([PY, "-m", "http.server", "0", "--bind", "127.0.0.1"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        port = int(holder.stdout.readline().split("port ")[1].split()[0])
        svc = Service("mlflow", [PY, "-c", "pass"], {}, "", port=port)
        with pytest.raises(supervisor.PlatformError, match=rf"port {port} is in use by pid {holder.pid} "):
            supervisor.start(svc, tmp_path, "127.0.0.1")
        assert not (tmp_path / "mlflow.json").exists()  # nothing started
    finally:
        holder.kill()
        holder.wait()


def test_a_service_that_dies_at_start_shows_its_log(tmp_path):
    svc = Service("prefect-server", [PY, "-c", "import sys; print('cannot open database'); sys.exit(3)"], {}, "")
    rec = supervisor.start(svc, tmp_path, "127.0.0.1")
    with pytest.raises(supervisor.PlatformError, match=r"(?s)exited during start-up.*cannot open database"):
        supervisor.wait_ready(svc, rec, lambda: False, timeout_s=30, say=lambda _: None)


def test_a_service_that_never_answers_times_out_with_its_log(tmp_path):
    svc = Service("mlflow", [PY, "-c", "print('listening soon', flush=True); import time; time.sleep(60)"], {}, "")
    rec = supervisor.start(svc, tmp_path, "127.0.0.1")
    try:
        with pytest.raises(supervisor.PlatformError, match=r"(?s)not become healthy within 2s.*listening soon"):
            supervisor.wait_ready(svc, rec, lambda: supervisor.http_ok("http://127.0.0.1:9/health", 0.2),
                                  timeout_s=2, say=lambda _: None)
    finally:
        supervisor.stop(tmp_path, "mlflow")


def test_stop_ends_the_whole_tree_even_children_in_their_own_session(tmp_path):
    """Like `loraflow serve` -> vLLM or the worker -> a flow run: the child starts its own session."""
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True); "
            "print(c.pid, flush=True); time.sleep(300)")
    rec = supervisor.start(Service("serve", [PY, "-c", code], {}, ""), tmp_path, "127.0.0.1")
    deadline = time.time() + 20
    while not (tmp_path / "serve.log").read_text().strip().splitlines()[-1].isdigit():
        assert time.time() < deadline
        time.sleep(0.1)
    child = int((tmp_path / "serve.log").read_text().strip().splitlines()[-1])
    assert psutil.pid_exists(child) and supervisor.alive(rec)
    assert supervisor.stop(tmp_path, "serve", timeout_s=10) == "stopped"
    for pid in (rec["pid"], child):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert supervisor.read_record(tmp_path, "serve") is None
    assert supervisor.stop(tmp_path, "serve") == "not started"


def test_a_recycled_pid_is_not_taken_for_our_service(tmp_path):
    rec = {"pid": os.getpid(), "create_time": psutil.Process().create_time() - 1000}
    assert not supervisor.alive(rec)
    me = psutil.Process()
    assert not supervisor.alive({"pid": os.getpid(), "create_time": me.create_time() - 1000,
                                 "since_boot": supervisor.since_boot(me) - 1000})
    (tmp_path / "worker.json").write_text("{not json")
    with pytest.raises(supervisor.PlatformError, match=r"worker\.json: unreadable"):
        supervisor.read_record(tmp_path, "worker")


def test_a_running_service_stays_ours_when_the_kernels_boot_time_moves(monkeypatch):
    """Linux recomputes btime on each read of /proc/stat; seen here: it moved by 1 s while the platform ran,
    and the wall-clock start-time check then reported every service down and `down` stopped none."""
    me = psutil.Process()
    rec = {"pid": os.getpid(), "create_time": me.create_time(), "since_boot": supervisor.since_boot(me)}
    assert supervisor.alive(rec)
    boot, created = psutil.boot_time(), me.create_time()
    monkeypatch.setattr(psutil, "boot_time", lambda: boot + 1.0)
    monkeypatch.setattr(psutil.Process, "create_time", lambda self: created + 1.0)
    assert supervisor.alive(rec)


def test_secrets_are_generated_once_private_and_the_environment_wins(tmp_path, monkeypatch):
    for k in ("LORAFLOW_WEBHOOK_SECRET", "LORAFLOW_API_KEYS", "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"):
        monkeypatch.delenv(k, raising=False)
    first = load_secrets(tmp_path)
    assert stat.S_IMODE((tmp_path / "secrets.env").stat().st_mode) == 0o600
    assert load_secrets(tmp_path) == first  # a restart keeps webhook signatures and client keys valid
    from cryptography.fernet import Fernet

    Fernet(first["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"])  # MLflow's key format
    monkeypatch.setenv("LORAFLOW_API_KEYS", "mine")
    assert load_secrets(tmp_path)["LORAFLOW_API_KEYS"] == "mine"


def test_one_database_url_gives_each_server_its_own_database():
    mlflow, prefect = database_urls("postgresql://u:s3cret@db:5432/loraflow?sslmode=require")
    assert mlflow == "postgresql://u:s3cret@db:5432/loraflow_mlflow?sslmode=require"
    assert prefect == "postgresql+asyncpg://u:s3cret@db:5432/loraflow_prefect?sslmode=require"
    assert "s3cret" not in redact_url("postgresql://u:s3cret@db:5432/loraflow")


def test_platform_settings_are_validated_naming_the_key(tmp_path):
    from pipeline.config import ConfigError, load_params

    f = tmp_path / "p.yaml"
    f.write_text("platform: {retrain_cron: 'every monday'}\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: platform\.retrain_cron: not a 5-field cron"):
        load_params(f)
    f.write_text("platform: {database_url: 'mysql://x'}\n")
    with pytest.raises(ConfigError, match=r"platform\.database_url: only postgresql.*\(got 'mysql://x'\)"):
        load_params(f)


def test_unreachable_database_is_a_clear_error():
    from pipeline.config import ConfigError
    from pipeline.platform.services import ensure_databases

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match=rf"cannot connect to postgresql://u:\*\*\*@127.0.0.1:{port}/loraflow"):
        ensure_databases(f"postgresql://u:pw@127.0.0.1:{port}/loraflow", timeout_s=2)


def test_a_profile_that_names_a_server_keeps_prefect_home(tmp_path, monkeypatch):
    """The CLI only makes Prefect project-local when the user has no server configured."""
    from flows import cli

    profiles = tmp_path / "profiles.toml"
    profiles.write_text('active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://prefect.internal:4200/api"\n')
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(profiles))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    cli._embedded_defaults()
    assert "PREFECT_HOME" not in os.environ
    profiles.write_text('active = "local"\n[profiles.local]\n')
    cli._embedded_defaults()
    assert os.environ["PREFECT_HOME"].endswith(".prefect")


def test_a_dead_platform_is_not_used(tmp_path):
    """`loraflow run` after a reboot: the recorded MLflow server is gone, so the store is used directly."""
    from flows.platform import platform_env

    run = tmp_path / "run"
    run.mkdir()
    (run / "platform.json").write_text(json.dumps({"run_dir": str(run), "client_env": {"PREFECT_API_URL": "x"}}))
    (run / "mlflow.json").write_text(json.dumps({"pid": 2**22 + 7, "create_time": 0}))
    assert platform_env(tmp_path) == {}
    (run / "mlflow.json").write_text(json.dumps({"pid": os.getpid(), "create_time": psutil.Process().create_time()}))
    assert platform_env(tmp_path) == {"PREFECT_API_URL": "x"}


def test_retrain_limit_applies_with_any_configured_server(prefect_server, monkeypatch):
    """The test harness configures its server through Prefect settings, not PREFECT_API_URL in the
    environment: the limit must be taken all the same."""
    from prefect.client.orchestration import get_client

    from flows.retrain import _prefect_limit

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with _prefect_limit("loraflow-retrain-limit-test"):
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name("loraflow-retrain-limit-test")
    assert limit.limit == 1 and limit.active_slots == 1


def test_long_cards_fit_mlflow_description_column():
    from pipeline.registry import MAX_DESCRIPTION, version_description

    card = "---\nbase_model: x\n---\n\n# m\n\n## Lineage\n" + "- `k`: `v`\n" * 2000
    d = version_description(card, "run1")
    assert len(d) <= MAX_DESCRIPTION and d.startswith("# m") and "runs:/run1/adapter/README.md" in d
    assert version_description("short", "r") == "short"


def test_a_bad_database_url_is_reported_without_its_password(tmp_path):
    from pipeline.config import ConfigError, load_params

    f = tmp_path / "p.yaml"
    f.write_text("platform: {database_url: 'mysql://app:hunter2@db/x'}\n")
    with pytest.raises(ConfigError) as err:
        load_params(f)
    assert "hunter2" not in str(err.value) and "app:***@db" in str(err.value)
