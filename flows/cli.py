"""The ``loraflow`` command line.

    loraflow demo                   # the whole loop on embedded defaults (make demo)
    loraflow run                    # the Prefect flow `retrain`
    loraflow sanitize IN... --out DIR
    loraflow serve                  # the authenticated endpoint over vLLM, following the alias
    loraflow promote VERSION | rollback | drift | status
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="loraflow: LoRA fine-tuning, end to end.")
ParamsOpt = typer.Option("params.yaml", "--params", "-p", envvar="LORAFLOW_PARAMS",
                         help="parameters file (or an overlay with `extends: params.yaml`)")


def _embedded_defaults() -> None:
    """Laptop defaults, before Prefect is imported: project-local Prefect home, no analytics."""
    os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve()))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _params(path: str):
    from pipeline.config import ConfigError, load_params

    try:
        return load_params(path)
    except ConfigError as err:
        typer.secho(f"error: invalid parameters\n{err}", fg="red", err=True)
        raise typer.Exit(2) from None


def _say(msg: str) -> None:
    typer.secho(msg, fg="cyan")


@app.command()
def demo(params: str = ParamsOpt, requests: int = typer.Option(40, help="sample requests to send"),
         keep_serving: bool = typer.Option(False, help="leave vLLM running afterwards")) -> None:
    """Retrain, serve the champion with vLLM, send sample traffic, check drift, print a summary."""
    _params(params)
    from flows.demo import format_summary, run_demo

    report, server = run_demo(params, requests=requests, keep_serving=keep_serving, progress=_say)
    typer.echo(format_summary(report))
    if keep_serving and server.process is not None:
        typer.echo(f"vLLM keeps running at {server.url} (pid {server.process.pid}); stop it with kill {server.process.pid}")


@app.command()
def run(params: str = ParamsOpt,
        sync_server: bool = typer.Option(False, help="hot-load the champion into the vLLM at serve.url")) -> None:
    """Run the Prefect flow `retrain` (unchanged DVC stages are skipped)."""
    _params(params)
    from flows.retrain import retrain

    summary = retrain(params_file=params, sync_server=sync_server)
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command()
def sanitize(inputs: list[Path] = typer.Argument(..., help="JSONL, CSV/TSV, Parquet files or datasets folders"),
             out: Path = typer.Option(..., "--out", help="output directory"),
             params: str | None = typer.Option(
                 None, "--params", "-p", envvar="LORAFLOW_PARAMS",
                 help="parameters file for the sanitize and task settings; default: ./params.yaml if there "
                      "is one, else built-in defaults (any answer accepted)"),
             reference: Path | None = typer.Option(None, help="clean train file to check contamination against")) -> None:
    """Validate, redact and deduplicate INPUTS into OUT (clean, quarantine, report, data card)."""
    from pipeline.config import Params
    from pipeline.data.ingest import UnsupportedInput
    from pipeline.data.sanitize import NoValidRecords, index_from_file, sanitize_files
    from pipeline.tasks import build_task

    if params is None and not Path("params.yaml").is_file():
        _say("no params.yaml here: built-in sanitize defaults, answers are not checked against a task")
        p = Params()
    else:
        p = _params(params or "params.yaml")
    cfg = p.sanitize
    try:
        ref = index_from_file(reference, cfg) if reference else None
        report = sanitize_files(list(inputs), out, cfg, task=build_task(p.task), reference=ref, progress=_say)
    except (NoValidRecords, FileNotFoundError, UnsupportedInput) as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(1) from None
    q, d = report["quarantined"], report["duplicates"]
    typer.echo(f"read {report['read']} = kept {report['kept']} + quarantined {q['total']} + duplicates {d['total']}"
               f"; redactions {report['redactions']['by_type']}; quarantine reasons {q['by_reason']}")
    typer.echo(f"wrote {out}/clean.jsonl, quarantine.jsonl, report.json, data_card.md")


@app.command()
def serve(params: str = ParamsOpt,
          once: bool = typer.Option(False, help="sync the champion into a running server (serve.url) and exit")) -> None:
    """One authenticated OpenAI-compatible endpoint over vLLM, following each model's champion alias."""
    p = _params(params)
    if once:
        from pipeline.release import promotion
        from pipeline.serve.vllm import VLLMServer

        server = VLLMServer.attach(p.serve, os.environ.get("LORAFLOW_VLLM_API_KEY", ""))
        server.wait_ready(progress=_say)
        result = promotion.serve_champion(p, server)
        _say(f"serving {result['served']}" if result.get("served") else result["reason"])
        return
    _run_gateway(p)


def _rejected_event(result: dict) -> None:
    """A Prefect event for a version serving refused (automations can page someone on it)."""
    from prefect.events import emit_event

    emit_event(event="loraflow.serving.rejected", resource={"prefect.resource.id": f"loraflow.model.{result['model']}"},
               payload=result)


def _run_gateway(p) -> None:
    import secrets
    import signal
    import threading

    from pipeline.serve.follow import Follower
    from pipeline.serve.gateway import GatewayServer, RequestLog, Routes, build_app, load_keys
    from pipeline.serve.vllm import VLLMServer
    from pipeline.release.promotion import smoke_prompts
    from pipeline.stages import clean_split

    try:
        keys = load_keys(p.serve.gateway_key_file)
    except ValueError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    stop, wake = threading.Event(), threading.Event()

    def on_term(*_) -> None:  # SIGTERM (docker stop, systemd, kill) ends like Ctrl-C: our vLLM goes with us
        stop.set()
        wake.set()

    signal.signal(signal.SIGTERM, on_term)
    if p.serve.url:
        server = VLLMServer.attach(p.serve, os.environ.get("LORAFLOW_VLLM_API_KEY", ""))
    else:
        _say(f"starting vLLM on {p.serve.base_url}, reachable only from this host (log: {p.serve.log_file})")
        server = VLLMServer.start(p.serve, Path(p.base.out_dir), api_key=secrets.token_urlsafe(32))
    gateway = None
    try:
        waited = server.wait_ready(progress=_say)
        _say(f"vLLM ready after {waited:.0f}s")
        routes = Routes()
        models = p.serve.models or [p.project.name]
        follower = Follower(server, routes, p.registry, Path(p.serve.adapters_dir), models, p.task,
                            smoke_prompts(clean_split(p, "eval")), say=_say, on_reject=_rejected_event)
        log = RequestLog(Path(p.serve.traffic_log), int(p.serve.log_max_mb * 2**20), p.serve.log_retention_days,
                         tuple(p.sanitize.phone_regions))
        secret = os.environ.get("LORAFLOW_WEBHOOK_SECRET", "")

        def on_alias(name: str, alias: str, version: int) -> None:
            if name in models and alias == p.registry.alias:
                _say(f"webhook: {name}@{alias} -> v{version}")
                wake.set()

        app = build_app(routes, server.url, server.api_key, keys, log, webhook_secret=secret, on_alias=on_alias)
        gateway = GatewayServer(app, p.serve.gateway_host, p.serve.gateway_port).start()
        if secret and p.registry.tracking_uri.startswith(("http://", "https://")):
            from pipeline.release import registry

            hook_url = p.serve.webhook_url or f"http://{p.serve.gateway_host}:{p.serve.gateway_port}/hooks/mlflow"
            try:
                registry.ensure_webhook(p.registry, f"loraflow-serve-{p.serve.gateway_port}", hook_url, secret)
                _say(f"MLflow webhook registered: alias moves reach {hook_url}")
            except Exception as e:  # noqa: BLE001 - polling still follows the alias
                _say(f"warning: could not register the MLflow webhook ({e}); following by polling only")
        delay = p.serve.poll_interval_s
        first = True
        while not stop.is_set():
            try:
                follower.reconcile()
                delay = p.serve.poll_interval_s
            except Exception as e:  # noqa: BLE001 - MLflow or vLLM hiccups: report, back off, keep serving
                delay = min(delay * 2, 300)
                _say(f"warning: could not reconcile with the registry ({type(e).__name__}: {e}); retry in {delay:.0f}s")
            if first:
                served = ", ".join(f"{r.name} (v{r.version})" for r in routes.all()) or "nothing yet (no champion)"
                _say(f"serving {served}; following @{p.registry.alias} every {p.serve.poll_interval_s:.0f}s")
                typer.echo(f"endpoint: {gateway.url}", color=False)
                first = False
            wake.wait(delay)
            wake.clear()
    except KeyboardInterrupt:
        pass
    finally:
        if gateway is not None:
            gateway.stop()
            log.flush()
        server.stop()
        _say("stopped")


@app.command()
def promote(version: int, params: str = ParamsOpt) -> None:
    """Move the champion alias to VERSION (serving follows it)."""
    p = _params(params)
    from pipeline.release import registry

    info = registry.promote(p.registry, p.project.name, version)
    typer.echo(f"{info.name}@{p.registry.alias} -> v{info.version}")


@app.command()
def rollback(params: str = ParamsOpt) -> None:
    """Move the champion alias back to the version it pointed at before."""
    p = _params(params)
    from pipeline.release import registry

    try:
        info = registry.rollback(p.registry, p.project.name)
    except LookupError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{info.name}@{p.registry.alias} -> v{info.version}")


@app.command()
def drift(params: str = ParamsOpt) -> None:
    """Run the Prefect flow `drift-check` on the logged serving traffic."""
    _params(params)
    from flows.monitor import drift_check

    typer.echo(json.dumps(drift_check(params_file=params), indent=2, default=str))


@app.command()
def status(params: str = ParamsOpt) -> None:
    """Registered versions, their gate result and which one holds the alias."""
    p = _params(params)
    from pipeline.release import registry

    champ = registry.get_alias(p.registry, p.project.name)
    c = registry.client(p.registry)
    versions = c.search_model_versions(f"name = '{p.project.name}'")
    if not versions:
        typer.echo(f"no versions of {p.project.name} registered yet")
        return
    for mv in sorted(versions, key=lambda v: int(v.version)):
        mark = f"@{p.registry.alias}" if champ and int(mv.version) == champ.version else ""
        serving = mv.tags.get("serving_status", "")
        typer.echo(f"v{mv.version:<3} gate_promote={mv.tags.get('gate_promote')} commit={mv.tags.get('git_commit', '?')[:12]} "
                   f"{mark} {serving[:100]}".rstrip())
    _served_status(p)


def _served_status(p) -> None:
    """What the running gateway serves under each stable name (needs a client key in LORAFLOW_API_KEYS)."""
    import httpx

    from pipeline.serve.gateway import KEYS_ENV, env_keys

    url = f"http://{p.serve.gateway_host}:{p.serve.gateway_port}/v1/models"
    key = next(iter(env_keys()), "")
    try:
        r = httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=5)
    except httpx.HTTPError:
        typer.echo(f"gateway: not running at {url}")
        return
    if r.status_code != 200:
        typer.echo(f"gateway: {url} answered HTTP {r.status_code} (set {KEYS_ENV} to a client key)")
        return
    for m in r.json()["data"]:
        typer.echo(f"serving {m['id']} = v{m['version']}")


def main() -> None:
    _embedded_defaults()
    try:
        app()
    except Exception as err:  # a clear one-line error for users; the traceback stays available
        if os.environ.get("LORAFLOW_DEBUG"):
            raise
        from pipeline.config import ConfigError

        typer.secho(f"error: {type(err).__name__}: {err}", fg="red", err=True)
        if not isinstance(err, ConfigError):
            typer.secho("(set LORAFLOW_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
