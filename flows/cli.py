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
         keep_serving: bool = typer.Option(False, help="keep the endpoint answering afterwards (Ctrl-C stops it)")) -> None:
    """Retrain, serve the champion through the gateway, send sample traffic, check drift, print a summary."""
    _params(params)
    from flows.demo import format_summary, run_demo

    report, endpoint = run_demo(params, requests=requests, keep_serving=keep_serving, progress=_say)
    typer.echo(format_summary(report))
    if keep_serving:
        import threading

        _say(f"endpoint keeps answering at {endpoint.url} for the keys in LORAFLOW_API_KEYS; Ctrl-C stops it")
        try:
            endpoint.follow(threading.Event())
        except KeyboardInterrupt:
            pass
        finally:
            endpoint.stop()


@app.command()
def run(params: str = ParamsOpt) -> None:
    """Run the Prefect flow `retrain` (unchanged DVC stages are skipped; a running `loraflow serve` follows
    the alias by itself)."""
    _params(params)
    from flows.retrain import retrain

    summary = retrain(params_file=params)
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
def serve(params: str = ParamsOpt) -> None:
    """One authenticated OpenAI-compatible endpoint over vLLM, following each model's champion alias."""
    _run_gateway(_params(params))


def _rejected_event(result: dict) -> None:
    """A Prefect event for a version serving refused (automations can page someone on it)."""
    from prefect.events import emit_event

    emit_event(event="loraflow.serving.rejected", resource={"prefect.resource.id": f"loraflow.model.{result['model']}"},
               payload=result)


def _run_gateway(p) -> None:
    import signal
    import threading

    from pipeline.serve.endpoint import Endpoint, start_vllm
    from pipeline.serve.gateway import load_keys

    try:
        keys = load_keys(p.serve.gateway_key_file)
    except ValueError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    stop = threading.Event()
    endpoint = Endpoint(p, start_vllm(p, _say), keys, say=_say, on_reject=_rejected_event,
                        webhook_secret=os.environ.get("LORAFLOW_WEBHOOK_SECRET", ""))

    def on_term(*_) -> None:  # SIGTERM (docker stop, systemd, kill) ends like Ctrl-C: our vLLM goes with us
        stop.set()
        endpoint.wake.set()

    signal.signal(signal.SIGTERM, on_term)
    try:
        endpoint.open()
        _register_webhook(p, endpoint.webhook_secret)
        _say(f"serving {endpoint.served()}; following @{p.registry.alias} every {p.serve.poll_interval_s:.0f}s")
        typer.echo(f"endpoint: {endpoint.url}", color=False)
        endpoint.follow(stop)
    except KeyboardInterrupt:
        pass
    finally:
        endpoint.stop()
        _say("stopped")


def _register_webhook(p, secret: str) -> None:
    """Alias moves reach the gateway at once when MLflow is a server (webhooks need one); polling otherwise."""
    if not secret or not p.registry.tracking_uri.startswith(("http://", "https://")):
        return
    from pipeline.release import registry

    hook_url = p.serve.webhook_url or f"http://{p.serve.gateway_host}:{p.serve.gateway_port}/hooks/mlflow"
    try:
        registry.ensure_webhook(p.registry, f"loraflow-serve-{p.serve.gateway_port}", hook_url, secret)
        _say(f"MLflow webhook registered: alias moves reach {hook_url}")
    except Exception as e:  # noqa: BLE001 - polling still follows the alias
        _say(f"warning: could not register the MLflow webhook ({e}); following by polling only")


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
        interval = mv.tags.get("gate_interval", "")
        typer.echo(f"v{mv.version:<3} gate_promote={mv.tags.get('gate_promote')} promotion={mv.tags.get('promotion', '-')} "
                   f"{'CI ' + interval + ' ' if interval else ''}commit={mv.tags.get('git_commit', '?')[:12]} "
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
