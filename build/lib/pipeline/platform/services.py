"""The services of the platform and the one command line each starts with.

    loraflow up                    # all of them, in the background (supervisor.py)
    loraflow service <name>        # one of them in the foreground (what docker-compose.yml runs)

Prefect server and MLflow tracking server share one database setting (``platform.database_url``, or
``LORAFLOW_DATABASE_URL``): empty keeps SQLite files, a PostgreSQL URL puts each on its own database of
that server. Secrets (webhook secret, MLflow's key for stored webhook secrets, client API keys) come from
the environment or are generated once into ``<state_dir>/secrets.env`` (mode 0600) and kept across restarts.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pipeline.config import TRACKING_URI_ENV, ConfigError, Params

DATABASE_ENV = "LORAFLOW_DATABASE_URL"
# Secrets the platform needs; each is taken from the environment when set, else generated once.
SECRET_NAMES = ("LORAFLOW_WEBHOOK_SECRET", "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY", "LORAFLOW_API_KEYS")
SERVICE_NAMES = ("prefect-server", "mlflow", "worker", "serve")


def loopback(host: str) -> str:
    """How this machine's clients reach a server bound to ``host`` (all interfaces: via 127.0.0.1)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


@dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]          # added to the caller's environment
    url: str                     # what a person opens or a client calls
    health: str = ""             # answers HTTP 200 once the service is ready ("" = checked otherwise)
    port: int | None = None      # must be free before the service starts
    secret_env: tuple[str, ...] = field(default=())  # env keys never printed


@dataclass(frozen=True)
class Platform:
    """Where the platform's pieces live, resolved from params and the environment."""

    p: Params
    params_file: str
    root: Path

    @property
    def cfg(self):
        return self.p.platform

    @property
    def state_dir(self) -> Path:
        return (self.root / self.cfg.state_dir).resolve()

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def connect_host(self) -> str:
        """How this machine's clients reach a service bound to ``platform.host``."""
        return loopback(self.cfg.host)

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.connect_host}:{self.cfg.prefect_port}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.connect_host}:{self.cfg.mlflow_port}"

    @property
    def database_url(self) -> str:
        return os.environ.get(DATABASE_ENV, "") or self.cfg.database_url

    @property
    def gateway_url(self) -> str:
        return f"http://{loopback(self.p.serve.gateway_host)}:{self.p.serve.gateway_port}"


def database_urls(url: str) -> tuple[str, str]:
    """(MLflow's SQLAlchemy URL, Prefect's asyncpg URL) on the databases ``<name>_mlflow`` and
    ``<name>_prefect`` of the server in ``url``: the two never share tables (both keep an alembic_version)."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/") or "loraflow"
    mlflow = urlunsplit(("postgresql", parts.netloc, f"/{name}_mlflow", parts.query, ""))
    prefect = urlunsplit(("postgresql+asyncpg", parts.netloc, f"/{name}_prefect", parts.query, ""))
    return mlflow, prefect


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return url


def stored_secrets(state_dir: Path) -> dict[str, str]:
    """What ``load_secrets`` generated into ``<state_dir>/secrets.env`` (empty when nothing was)."""
    path = state_dir / "secrets.env"
    stored: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            key, sep, value = line.partition("=")
            if sep and not key.startswith("#"):
                stored[key.strip()] = value.strip()
    return stored


def load_secrets(state_dir: Path) -> dict[str, str]:
    """The platform's secrets: the environment's where set, else the generated ones in secrets.env (made
    once, mode 0600, so a restart keeps webhook signatures and client keys valid)."""
    path = state_dir / "secrets.env"
    stored = stored_secrets(state_dir)
    missing = [k for k in SECRET_NAMES if k not in stored]
    if missing:
        for key in missing:
            stored[key] = _fernet_key() if key == "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY" else secrets.token_urlsafe(32)
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("# Generated by `loraflow up`; an environment variable of the same name wins. Keep private.\n")
            fh.writelines(f"{k}={v}\n" for k, v in stored.items())
    return {k: os.environ.get(k) or stored[k] for k in SECRET_NAMES}


def _fernet_key() -> str:
    import base64

    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


def _bin(name: str) -> str:
    """A console script of this environment (the platform runs from the project's venv)."""
    here = Path(sys.executable).with_name(name)
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise ConfigError(f"`{name}` is not installed in this environment ({sys.executable}); run `make env`")
    return found


def services(plat: Platform, secret: dict[str, str]) -> list[Service]:
    """The platform's services in start order. ``secret``: from ``load_secrets``."""
    p, cfg, root = plat.p, plat.cfg, plat.root
    host = cfg.host
    common = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
              "PREFECT_HOME": str(root / ".prefect"), "TOKENIZERS_PARALLELISM": "false"}
    prefect_env = dict(common)
    mlflow_store = p.registry.tracking_uri
    if plat.database_url:
        mlflow_store, prefect_db = database_urls(plat.database_url)
        prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"] = prefect_db
    elif not mlflow_store.startswith(("sqlite:", "postgresql:", "mysql:")):
        raise ConfigError(f"registry.tracking_uri: {mlflow_store} is not a database the MLflow server can own; "
                          "keep sqlite:///... (default) or set platform.database_url")
    if mlflow_store.startswith("sqlite:///"):
        db = Path(mlflow_store.removeprefix("sqlite:///"))
        db = db if db.is_absolute() else root / db
        db.parent.mkdir(parents=True, exist_ok=True)
        mlflow_store = f"sqlite:///{db}"
    artifacts = os.environ.get("MLFLOW_ARTIFACTS_DESTINATION", "")
    if artifacts:  # compose: the server proxies artifacts to object storage
        art_args = ["--serve-artifacts", "--artifacts-destination", artifacts]
    else:  # same machine: clients read and write the artifact folder directly
        art = Path(p.registry.artifact_root)
        art = art if art.is_absolute() else root / art
        art.mkdir(parents=True, exist_ok=True)
        art_args = ["--no-serve-artifacts", "--default-artifact-root", art.resolve().as_uri()]
    mlflow_env = {**common, "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                  "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": secret["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"]}
    mlflow_args = [_bin("mlflow"), "server", "--backend-store-uri", mlflow_store, *art_args,
                   "--host", host, "--port", str(cfg.mlflow_port), "--workers", "1"]
    if host in ("0.0.0.0", "::"):  # in a container: other services call it by its service name
        mlflow_args += ["--allowed-hosts", "*"]
    # What every process that runs flows or serves needs to find the servers (no user-set variables).
    clients = {**common, "PREFECT_API_URL": plat.prefect_api_url, TRACKING_URI_ENV: plat.mlflow_url,
               "LORAFLOW_PARAMS": plat.params_file}
    out = [
        Service("prefect-server", [_bin("prefect"), "server", "start", "--host", host, "--port", str(cfg.prefect_port)],
                prefect_env, f"http://{plat.connect_host}:{cfg.prefect_port}", f"{plat.prefect_api_url}/health",
                cfg.prefect_port),
        Service("mlflow", mlflow_args, mlflow_env, plat.mlflow_url, f"{plat.mlflow_url}/health", cfg.mlflow_port,
                ("MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY",)),
        Service("worker", [_bin("prefect"), "worker", "start", "--pool", cfg.work_pool, "--type", "process",
                           "--name", f"loraflow-{socket.gethostname()}"],
                clients, f"work pool {cfg.work_pool}"),
    ]
    if cfg.serve:
        out.append(Service("serve", [_bin("loraflow"), "serve", "--params", plat.params_file],
                           {**clients, "LORAFLOW_API_KEYS": secret["LORAFLOW_API_KEYS"],
                            "LORAFLOW_WEBHOOK_SECRET": secret["LORAFLOW_WEBHOOK_SECRET"]},
                           f"{plat.gateway_url}/v1", f"{plat.gateway_url}/health", p.serve.gateway_port,
                           ("LORAFLOW_API_KEYS", "LORAFLOW_WEBHOOK_SECRET")))
    return out


def ensure_databases(url: str, timeout_s: float = 10) -> list[str]:
    """Create ``<name>_mlflow`` and ``<name>_prefect`` (and Prefect's pg_trgm extension) when missing;
    returns what was created. Needs a role allowed to create databases, else says what to run."""
    import sqlalchemy as sa

    mlflow_url, prefect_url = database_urls(url)
    # The server's maintenance database (the named one is only a prefix and need not exist).
    maintenance = urlunsplit(("postgresql",) + tuple(urlsplit(url))[1:2] + ("/postgres",) + tuple(urlsplit(url))[3:])
    admin = sa.create_engine(maintenance, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": int(timeout_s)})
    created = []
    try:
        with admin.connect() as conn:
            for db_url in (mlflow_url, prefect_url):
                name = urlsplit(db_url).path.lstrip("/")
                if conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first():
                    continue
                try:
                    conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
                    created.append(name)
                except sa.exc.ProgrammingError as err:
                    raise ConfigError(f"platform.database_url: cannot create database {name} ({err.orig}); "
                                      f"create it as an administrator: CREATE DATABASE \"{name}\";") from None
        prefect_sync = urlunsplit(("postgresql",) + tuple(urlsplit(prefect_url))[1:])
        eng = sa.create_engine(prefect_sync, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": int(timeout_s)})
        try:
            with eng.connect() as conn:
                conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_trgm"))
        finally:
            eng.dispose()
    except sa.exc.OperationalError as err:
        raise ConfigError(f"platform.database_url: cannot connect to {redact_url(url)}: "
                          f"{str(err.orig).strip().splitlines()[0]}") from None
    finally:
        admin.dispose()
    return created
