"""Start, health-check, list and stop the platform's services as background processes.

Each service runs in its own session with its output in ``<state_dir>/run/<name>.log`` and a record
``<name>.json`` (PID, start time, URL, command without secrets). ``stop`` ends the whole process tree
(a PID's descendants are collected before the first signal, so children that moved to their own session,
like the vLLM under ``loraflow serve`` or a flow run under the worker, go too).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from pipeline.io import tail
from pipeline.platform.services import Service


class PlatformError(RuntimeError):
    """A service could not start (port taken, it exited, its health check never answered)."""


@dataclass(frozen=True)
class ServiceState:
    name: str
    running: bool
    pid: int | None
    url: str


def _record(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.json"


def log_file(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.log"


def read_record(run_dir: Path, name: str) -> dict | None:
    path = _record(run_dir, name)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise PlatformError(f"{path}: unreadable ({err}); remove it after checking no such process runs") from None


def since_boot(proc: psutil.Process) -> float:
    """When ``proc`` started, in seconds after boot. Its wall-clock ``create_time`` is boot time plus that,
    and Linux recomputes boot time on every read of /proc/stat: seen here, it moved by 1 s while the platform
    ran, so a wall-clock comparison took running services for dead ones and `down` left them running."""
    return proc.create_time() - psutil.boot_time()


def alive(record: dict | None) -> bool:
    """The recorded process still runs (same PID *and* start time: a recycled PID is not ours)."""
    if not record:
        return False
    try:
        proc = psutil.Process(record["pid"])
        if "since_boot" in record:
            same = abs(since_boot(proc) - record["since_boot"]) < 0.5
        else:  # a record written before since_boot existed
            same = abs(proc.create_time() - record["create_time"]) < 2.0
        return same and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
        return False


def listener(host: str, port: int) -> str | None:
    """Who listens on ``port`` ("pid 123 (python)"), or None when it is free to bind."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host if host not in ("", "::") else "0.0.0.0", port))
            return None
        except OSError:
            pass
    try:
        for conn in psutil.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                try:
                    return f"pid {conn.pid} ({' '.join(psutil.Process(conn.pid).cmdline()[:4])})"
                except psutil.Error:
                    return f"pid {conn.pid}"
    except psutil.AccessDenied:
        pass
    return "another process"


def http_ok(url: str, timeout_s: float = 3.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def start(svc: Service, run_dir: Path, bind_host: str, base_env: dict[str, str] | None = None) -> dict:
    """Start ``svc`` in the background (port checked first); returns its record."""
    if svc.port is not None:
        who = listener(bind_host, svc.port)
        if who:
            raise PlatformError(f"{svc.name}: port {svc.port} is in use by {who}; stop it or change the port "
                                "in params.yaml (platform.* / serve.gateway_port)")
    run_dir.mkdir(parents=True, exist_ok=True)
    log = log_file(run_dir, svc.name)
    env = {**(base_env if base_env is not None else os.environ), **svc.env}
    with open(log, "ab") as fh:
        fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} loraflow up: starting {svc.name}\n".encode())
        fh.flush()
        proc = subprocess.Popen(svc.argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    started = psutil.Process(proc.pid)
    record = {"name": svc.name, "pid": proc.pid, "create_time": started.create_time(), "since_boot": since_boot(started),
              "url": svc.url, "argv": svc.argv, "log": str(log), "started": time.time()}
    _record(run_dir, svc.name).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return record


def wait_ready(svc: Service, record: dict, check: Callable[[], bool], timeout_s: float,
               say: Callable[[str], None] = print) -> float:
    """Until ``check()`` holds; fails with the last lines of the log if the process exits or time runs out."""
    started = time.monotonic()
    note = 0.0
    while True:
        if check():
            return time.monotonic() - started
        waited = time.monotonic() - started
        if not alive(record):
            raise PlatformError(f"{svc.name} exited during start-up; last lines of {record['log']}:\n"
                                f"{tail(Path(record['log']))}")
        if waited > timeout_s:
            raise PlatformError(f"{svc.name} did not become healthy within {timeout_s:.0f}s; last lines of "
                                f"{record['log']}:\n{tail(Path(record['log']))}")
        if waited - note >= 20:
            say(f"  ... waiting for {svc.name} ({waited:.0f}s)")
            note = waited
        time.sleep(0.5)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop(run_dir: Path, name: str, timeout_s: float = 30) -> str:
    """Stop the recorded service and every descendant; returns what happened."""
    record = read_record(run_dir, name)
    if record is None:
        return "not started"
    if not alive(record):
        _record(run_dir, name).unlink(missing_ok=True)
        return "was not running"
    procs = _tree(record["pid"])
    for proc in procs:  # SIGTERM first: loraflow serve stops its vLLM, the worker its flow runs
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, survivors = psutil.wait_procs(procs, timeout=timeout_s)
    procs_late = [p for p in _tree(record["pid"]) if p not in procs]  # started while stopping
    for proc in [*survivors, *procs_late]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs([*survivors, *procs_late], timeout=10)
    _record(run_dir, name).unlink(missing_ok=True)
    return "stopped" if not survivors else f"stopped ({len(survivors)} process(es) killed after {timeout_s:.0f}s)"


def states(run_dir: Path, names: list[str], urls: dict[str, str]) -> list[ServiceState]:
    out = []
    for name in names:
        record = read_record(run_dir, name)
        running = alive(record)
        out.append(ServiceState(name, running, record["pid"] if record and running else None,
                                (record or {}).get("url", urls.get(name, ""))))
    return out
