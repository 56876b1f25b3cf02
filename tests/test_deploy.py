"""Deployment descriptions: static checks (no Docker daemon or Prefect server needed) and the MLflow server target."""

import importlib
import inspect
import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params
from pipeline.serve.vllm import launch_command
from tests.conftest import wait_healthy

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_compose_has_the_production_stack():
    assert {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker", "vllm", "serve-follower"} <= set(SERVICES)


def test_compose_dependencies_exist_and_have_no_cycle():
    graph = {}
    for name, svc in SERVICES.items():
        deps = svc.get("depends_on", [])
        graph[name] = list(deps) if isinstance(deps, (list, dict)) else []
        assert set(graph[name]) <= set(SERVICES), f"{name} depends on an unknown service"
    seen, done = set(), set()

    def visit(n):
        assert n not in seen or n in done, f"dependency cycle through {n}"
        if n in done:
            return
        seen.add(n)
        for d in graph[n]:
            visit(d)
        done.add(n)

    for n in graph:
        visit(n)


def test_compose_images_are_pinned_and_ports_unique():
    ports = []
    for name, svc in SERVICES.items():
        image = svc.get("image", "")
        assert image and ":" in image and not image.endswith(":latest"), f"{name}: unpinned image {image!r}"
        ports += [p.rsplit(":", 1)[0] for p in svc.get("ports", [])]  # [host-ip:]host-port
    assert len(ports) == len(set(ports))


def test_compose_files_and_volumes_exist():
    named = set(COMPOSE.get("volumes", {}))
    for name, svc in SERVICES.items():
        build = svc.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (ROOT / src).exists(), f"{name}: {src} missing"
            else:
                assert src in named, f"{name}: volume {src} not declared"


def test_gpu_services_reserve_a_gpu():
    for name in ("vllm", "prefect-worker"):
        devices = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]


def test_compose_vllm_flags_match_the_launcher():
    """The container and `loraflow serve` start vLLM with the same flags (values may differ)."""
    cfg = load_params(ROOT / "deploy/compose/params.yaml").serve
    ours = {a for a in launch_command(cfg, Path("/shared/base")) if a.startswith("--")}
    ours -= set(cfg.extra_args)
    compose = {a.split("=")[0] for a in SERVICES["vllm"]["command"]}
    assert ours == compose
    assert SERVICES["vllm"]["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "true"
    assert f"--dtype={cfg.dtype}" in SERVICES["vllm"]["command"]


def test_compose_overlay_points_at_compose_services():
    p = load_params(ROOT / "deploy/compose/params.yaml")
    assert p.registry.tracking_uri == "http://mlflow:5000" and "mlflow" in SERVICES
    assert p.serve.base_url == "http://vllm:8000"
    assert not p.monitor.retrain_on_drift  # the deployment trigger retrains; twice would be wrong


def test_prefect_deployments_point_at_real_flows_with_valid_parameters():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = set()
    for dep in spec["deployments"]:
        path, func = dep["entrypoint"].split(":")
        module = path.removesuffix(".py").replace("/", ".")
        flow = getattr(importlib.import_module(module), func)
        assert flow.__class__.__name__ == "Flow", dep["name"]
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(dep["parameters"]) <= accepted
        for trig in dep.get("triggers", []):
            assert set(trig.get("parameters", {})) <= accepted
        names.add(f"{flow.name}/{dep['name']}")
        for sched in dep.get("schedules", []):
            assert re.fullmatch(r"[\d*/,-]+( [\d*/,-]+){4}", sched["cron"])
    assert {"retrain/production", "drift-check/hourly"} <= names


def test_drift_event_emitted_is_the_one_the_retrain_trigger_expects():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    expected = {e for d in spec["deployments"] for t in d.get("triggers", []) for e in t["expect"]}
    source = (ROOT / "flows/monitor.py").read_text()
    assert expected == {"loraflow.drift.detected"} and '"loraflow.drift.detected"' in source


def test_only_the_authenticated_gateway_is_published_beyond_localhost():
    for name, svc in SERVICES.items():
        for port in svc.get("ports", []):
            if name != "serve-follower":
                assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
    assert "ports" not in SERVICES["vllm"]
    assert SERVICES["serve-follower"]["command"] == ["serve"]
    assert "LORAFLOW_API_KEYS" in SERVICES["serve-follower"]["environment"]


def test_secrets_come_from_the_environment_without_defaults():
    text = (ROOT / "docker-compose.yml").read_text()
    for var in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "VLLM_API_KEY", "LORAFLOW_API_KEYS",
                "LORAFLOW_WEBHOOK_SECRET"):
        assert re.search(r"\$\{" + var + r":-", text) is None, f"{var} has a default in the compose file"
        assert "${" + var + ":?" in text
        assert re.search(rf"^{var}=$", (ROOT / "deploy/compose/env.example").read_text(), re.M)


@pytest.mark.timeout(180)
def test_make_mlflow_server_serves_the_project_store(project):
    """`make mlflow-server` (settings: mlflow/server.env) serves the store loraflow writes by default."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from pipeline.config import RegistryConfig
    from pipeline.release import registry

    registry.experiment_id(registry.client(RegistryConfig()), RegistryConfig())  # sqlite:///mlflow/mlflow.db
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    venv = Path(sys.executable).parents[1]
    proc = subprocess.Popen(["make", "-o", "env", f"VENV={venv}", "mlflow-server"], cwd=project,
                            env={**os.environ, "MLFLOW_PORT": str(port)}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, lambda: proc.stdout.read().decode()[-2000:])
        served = registry.client(RegistryConfig(tracking_uri=f"http://127.0.0.1:{port}"))
        assert served.get_experiment_by_name("loraflow") is not None
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
