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
            vol = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", vol)  # ${VAR:-default}: the default must exist
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


def _compose_platform(monkeypatch):
    """The platform as the compose services resolve it: the overlay their LORAFLOW_PARAMS names, the
    environment compose gives them (the database URL, with a stand-in password), the image's working directory."""
    from flows.platform import platform_of

    env = SERVICES["prefect-worker"]["environment"]
    monkeypatch.setenv("LORAFLOW_DATABASE_URL", re.sub(r"\$\{[^}]+\}", "pw", env["LORAFLOW_DATABASE_URL"]))
    p = load_params(ROOT / env["LORAFLOW_PARAMS"])
    return platform_of(p, env["LORAFLOW_PARAMS"], Path("/opt/loraflow")), env


def test_every_compose_variable_is_in_the_env_example():
    used = set(re.findall(r"\$\{([A-Z_]+)[:?}]", (ROOT / "docker-compose.yml").read_text()))
    listed = set(re.findall(r"^([A-Z_]+)=", (ROOT / "deploy/compose/env.example").read_text(), re.M))
    assert used and used <= listed, used - listed


def test_compose_runs_the_commands_loraflow_up_runs(monkeypatch):
    """Each loraflow service is `loraflow service <name>` (or `serve`), and what that command would start
    listens where compose publishes it and where its health check and the other services look."""
    from pipeline.platform.services import services

    plat, env = _compose_platform(monkeypatch)
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", SERVICES["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"])
    specs = {s.name: s for s in services(plat, {k: "x" for k in ("LORAFLOW_WEBHOOK_SECRET", "LORAFLOW_API_KEYS",
                                                              "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY")})}
    assert SERVICES["mlflow"]["command"] == ["service", "mlflow"]
    assert SERVICES["prefect-server"]["command"] == ["service", "prefect-server"]
    assert SERVICES["prefect-worker"]["command"] == ["service", "worker"]
    assert SERVICES["serve-follower"]["command"] == ["serve"]
    for name, svc, port in (("mlflow", specs["mlflow"], plat.cfg.mlflow_port),
                            ("prefect-server", specs["prefect-server"], plat.cfg.prefect_port)):
        argv = svc.argv
        assert argv[argv.index("--host") + 1] == "0.0.0.0" and argv[argv.index("--port") + 1] == str(port)
        assert any(p.endswith(f":{port}:{port}") for p in SERVICES[name]["ports"]), name
        assert f":{port}/" in " ".join(SERVICES[name]["healthcheck"]["test"]), name
    assert "--serve-artifacts" in specs["mlflow"].argv  # MinIO behind the server, not a path in a container
    # Clients reach the servers by compose service name, on the ports the servers listen on.
    assert env["PREFECT_API_URL"] == f"http://prefect-server:{plat.cfg.prefect_port}/api"
    assert plat.p.registry.tracking_uri == f"http://mlflow:{plat.cfg.mlflow_port}"
    assert plat.p.serve.base_url == "http://vllm:8000" and "--port=8000" in SERVICES["vllm"]["command"]
    gw = plat.p.serve
    assert gw.webhook_url == f"http://serve-follower:{gw.gateway_port}/hooks/mlflow"
    assert SERVICES["serve-follower"]["ports"] == [f"127.0.0.1:{gw.gateway_port}:{gw.gateway_port}"]  # TLS in front
    assert f"reverse_proxy serve-follower:{gw.gateway_port} " in (ROOT / "deploy/compose/Caddyfile").read_text()
    assert not plat.cfg.serve  # the endpoint is its own service, not started by the worker's platform
    # One database setting for both servers, from the environment (the password stays in .env).
    assert plat.database_url.startswith("postgresql://loraflow:pw@postgres:5432/") and not plat.cfg.database_url
    assert "LORAFLOW_DATABASE_URL" in SERVICES["mlflow"]["environment"]
    init = (ROOT / "deploy/postgres/init.sql").read_text()
    from pipeline.platform.services import database_urls

    for url in database_urls(plat.database_url):
        assert f"CREATE DATABASE {url.rsplit('/', 1)[1]};" in init


def _volume_of(service: str, container_path: str) -> tuple[str, str] | None:
    """(volume, path inside it) holding ``container_path`` in ``service``."""
    best = None
    for vol in SERVICES[service].get("volumes", []):
        src, dst = vol.split(":")[:2]
        if container_path == dst or container_path.startswith(dst.rstrip("/") + "/"):
            if best is None or len(dst) > len(best[2]):
                best = (src, container_path[len(dst):].lstrip("/"), dst)
    return best[:2] if best else None


def test_compose_paths_one_service_writes_are_the_paths_another_reads(monkeypatch):
    plat, _ = _compose_platform(monkeypatch)
    p, wd = plat.p, "/opt/loraflow/"
    # The gateway writes the request and feedback logs; the worker's drift-check and curate stage read them.
    # curate is a DVC stage: it reads params.yaml itself, so the overlay must not move the log elsewhere.
    from pipeline.config import load_params
    from pipeline.layout import feedback_log

    stage_params = load_params(ROOT / "params.yaml")
    assert p.serve.traffic_log == stage_params.serve.traffic_log
    for log in (wd + p.serve.traffic_log, wd + str(feedback_log(p))):
        assert _volume_of("serve-follower", log) == _volume_of("prefect-worker", log) is not None
        assert _volume_of("prefect-worker", log)[0] in COMPOSE["volumes"]
    # The curated data version outlives the worker container.
    assert _volume_of("prefect-worker", wd + p.curate.out_dir)[0] in COMPOSE["volumes"]
    # The drift window state survives a worker restart.
    assert _volume_of("prefect-worker", p.monitor.out_dir) is not None
    # vLLM loads the base the worker builds and the adapters the gateway's follower downloads.
    base = wd + p.base.out_dir
    assert _volume_of("prefect-worker", base) == _volume_of("vllm", "/shared/base")
    assert _volume_of("serve-follower", p.serve.adapters_dir)[0] == _volume_of("vllm", "/shared")[0]
    # DVC's default remote (relative to .dvc/) is a named volume, not the container's own layer.
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".dvc/config")
    name = cfg["core"]["remote"]
    remote = next(cfg[sec]["url"] for sec in cfg.sections() if sec.strip("'") == f'remote "{name}"')
    resolved = str(Path("/opt/loraflow/.dvc", remote).resolve()) if "://" not in remote else remote
    vol = _volume_of("prefect-worker", resolved)
    assert vol is not None and vol[0] in COMPOSE["volumes"], resolved


def test_compose_deployments_read_the_params_file_compose_mounts(monkeypatch):
    from flows.platform import deployment_specs

    plat, env = _compose_platform(monkeypatch)
    for spec in deployment_specs(plat):
        assert spec["parameters"]["params_file"] == env["LORAFLOW_PARAMS"]
        if spec["trigger"]:
            assert spec["trigger"]["parameters"]["params_file"] == env["LORAFLOW_PARAMS"]
    assert (ROOT / env["LORAFLOW_PARAMS"]).is_file()


def test_deployments_point_at_real_flows_with_valid_parameters():
    from flows.platform import deployment_specs, platform_of

    plat = platform_of(load_params(ROOT / "params.yaml"), "params.yaml", ROOT)
    names = set()
    for spec in deployment_specs(plat):
        path, func = spec["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), func)
        assert flow.__class__.__name__ == "Flow" and flow.name == spec["flow"]
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(spec["parameters"]) <= accepted
        if spec["trigger"]:
            assert set(spec["trigger"]["parameters"]) <= accepted
            assert spec["trigger"]["expect"] == ["loraflow.drift.detected"]
        names.add(f"{spec['flow']}/{spec['name']}")
    assert names == {"retrain/production", "drift-check/production"}
    assert '"loraflow.drift.detected"' in (ROOT / "flows/monitor.py").read_text()


def test_long_running_compose_services_have_health_checks():
    """Every long-running service has one; the loraflow and vLLM ones are run against real services in
    tests/test_platform.py (compose_health_checks), healthy while up and failing once down."""
    for name, svc in SERVICES.items():
        if name != "minio-buckets":
            assert svc["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"
    from tests.test_platform import COMPOSE_PORTS

    for name, port in COMPOSE_PORTS.items():  # the mapping that test uses must be the compose file's
        assert f":{port}/" in " ".join(SERVICES[name]["healthcheck"]["test"]), name


def test_dockerignore_keeps_secrets_environments_and_run_state_out_of_images():
    import pathspec

    spec = pathspec.PathSpec.from_lines("gitwildmatch", (ROOT / ".dockerignore").read_text().splitlines())
    for path in (".env", ".venv/bin/python", ".venv-vllm/lib/x.py", ".loraflow/secrets.env", "prefect.toml",
                 "mlflow/mlflow.db", "artifacts/base/model.safetensors", "data/clean/train/clean.jsonl",
                 "data/serving/requests.jsonl", "reports/gate.json", ".dvc-storage/ab/cd", ".git/config"):
        assert spec.match_file(path), f"{path} would be copied into the image"
    for path in ("params.yaml", "deploy/compose/params.yaml", "flows/cli.py", "pipeline/config.py", "dvc.yaml",
                 "data/raw/tickets_train.jsonl", "requirements/pipeline.txt", ".dvc/config"):
        assert not spec.match_file(path), f"{path} is needed in the image"


def test_only_tls_in_front_of_the_authenticated_gateway_is_published_beyond_localhost():
    for name, svc in SERVICES.items():
        for port in svc.get("ports", []):
            if name != "tls":
                assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
    assert SERVICES["tls"]["ports"] == ["443:443"] and "ports" not in SERVICES["vllm"]
    assert SERVICES["serve-follower"]["command"] == ["serve"]
    assert "LORAFLOW_API_KEYS" in SERVICES["serve-follower"]["environment"]
    # The proxy terminates TLS and forwards to the gateway only; plain HTTP is never published.
    caddy = (ROOT / "deploy/compose/Caddyfile").read_text()
    site = re.search(r"^\{\$LORAFLOW_DOMAIN\} \{(.*)^\}", caddy, re.M | re.S).group(1)
    assert re.search(r"^\s*tls \{\$LORAFLOW_TLS\}$", site, re.M)
    assert re.search(r"^\s*reverse_proxy serve-follower:8080 ", site, re.M) and "http://" not in site
    assert "./deploy/compose/Caddyfile:/etc/caddy/Caddyfile:ro" in SERVICES["tls"]["volumes"]


def test_secrets_come_from_the_environment_without_defaults():
    text = (ROOT / "docker-compose.yml").read_text()
    for var in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "VLLM_API_KEY", "LORAFLOW_API_KEYS",
                "LORAFLOW_WEBHOOK_SECRET"):
        assert re.search(r"\$\{" + var + r":-", text) is None, f"{var} has a default in the compose file"
        assert "${" + var + ":?" in text
        assert re.search(rf"^{var}=$", (ROOT / "deploy/compose/env.example").read_text(), re.M)


@pytest.mark.timeout(180)
def test_loraflow_service_mlflow_serves_the_project_store(project):
    """`loraflow service mlflow` (what `loraflow up` and compose start) serves the store loraflow writes
    without a server, so runs made before `up` appear in the UI."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from pipeline.config import RegistryConfig
    from pipeline import registry

    registry.experiment_id(registry.client(RegistryConfig()), RegistryConfig())  # sqlite:///mlflow/mlflow.db
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    Path("local.yaml").write_text(f"extends: params.yaml\nplatform: {{mlflow_port: {port}}}\n")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("loraflow")), "service", "mlflow", "-p", "local.yaml"],
                            cwd=project, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")})
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, lambda: proc.stdout.read().decode()[-2000:])
        served = registry.client(RegistryConfig(tracking_uri=f"http://127.0.0.1:{port}"))
        assert served.get_experiment_by_name("loraflow") is not None
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
