"""The ``loraflow`` command line.

    loraflow demo                   # the whole loop on embedded defaults (make demo)
    loraflow up | down | status     # the platform: Prefect + MLflow servers, a worker, the endpoint
    loraflow run                    # the Prefect flow `retrain`
    loraflow sanitize IN... --out DIR
    loraflow serve                  # the authenticated endpoint over vLLM, following the alias
    loraflow promote VERSION | rollback | drift | status
    loraflow dossier [MODEL] [VERSION]  # the compliance dossier of a version (HTML + Markdown)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="loraflow: LoRA fine-tuning, end to end.")
ParamsOpt = typer.Option("params.yaml", "--params", "-p", envvar="LORAFLOW_PARAMS",
                         help="parameters file (or an overlay with `extends: params.yaml`)")


def _profile_api_url() -> str:
    """The API URL of the user's active Prefect profile (~/.prefect/profiles.toml), read without importing
    Prefect (its settings are fixed at import)."""
    import tomllib

    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return ""
    active = os.environ.get("PREFECT_PROFILE") or data.get("active", "ephemeral")
    return str(data.get("profiles", {}).get(active, {}).get("PREFECT_API_URL", ""))


def _embedded_defaults() -> None:
    """Laptop defaults, before Prefect is imported: project-local Prefect home (unless the user's profile
    names a server, which then stays in charge), no analytics."""
    if not os.environ.get("PREFECT_API_URL") and not _profile_api_url():
        os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve()))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The embedded server starts beside vLLM's start-up on a laptop; Prefect's 20 s is too short when both
    # share 2 cores (seen: "Timed out while attempting to connect to ephemeral Prefect API server").
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _params(path: str, platform: bool = True, training: bool = False):
    """Validated params; while `loraflow up` runs here, commands use its servers (``platform=False``: not).
    ``training``: also check ``train.trl`` against the installed TRL (imports TRL: seconds)."""
    from pipeline.config import ConfigError, load_params

    try:
        p = load_params(path)
        if training:
            from pipeline.train.trl_args import check_trl_keys

            check_trl_keys(p.train, path)
        if platform:
            from flows.platform import platform_env

            env = platform_env(Path(p.platform.state_dir))
            if env and any(os.environ.get(k) != v for k, v in env.items()):
                os.environ.update({k: v for k, v in env.items() if not os.environ.get(k)})
                p = load_params(path)
        return p
    except ConfigError as err:
        typer.secho(f"error: invalid parameters\n{err}", fg="red", err=True)
        raise typer.Exit(2) from None


def _say(msg: str) -> None:
    typer.secho(msg, fg="cyan")


@app.command()
def demo(params: str = ParamsOpt, requests: int = typer.Option(40, help="sample requests to send"),
         keep_serving: bool = typer.Option(False, help="keep the endpoint answering afterwards (Ctrl-C stops it)"),
         drift: bool = typer.Option(False, "--drift", help="then play the feedback loop: drifted traffic, user "
                                    "corrections, drift-check, retrain on the curated data, the new champion served"),
         drift_file: str = typer.Option("data/drift/feature_requests.jsonl", help="--drift: the drifted requests "
                                        "with their right answers (chat JSONL)"),
         feedback_share: float = typer.Option(0.6, min=0.0, max=1.0, help="--drift: share of wrong answers the "
                                              "simulated user corrects")) -> None:
    """Retrain, serve the champion through the gateway, send sample traffic, check drift, print a summary
    (with --drift: the whole feedback loop after it)."""
    p = _params(params, platform=False, training=True)
    from flows.platform import platform_env

    if platform_env(Path(p.platform.state_dir)):
        typer.secho("error: `loraflow up` is running here and owns the endpoint's ports; the demo starts its own "
                    "vLLM and gateway. Use the platform (README, \"The platform\") or `loraflow down` first.",
                    fg="red", err=True)
        raise typer.Exit(1)
    if drift:
        from flows.drift_demo import format_drift_summary, run_drift_demo

        typer.echo(format_drift_summary(run_drift_demo(params, drift_file=drift_file, requests=requests,
                                                       feedback_share=feedback_share, progress=_say)))
        return
    from flows.demo import format_summary, run_demo

    report, endpoint = run_demo(params, requests=requests, keep_serving=keep_serving, progress=_say)
    typer.echo(format_summary(report))
    if keep_serving:
        import signal
        import threading

        stop = threading.Event()

        def on_term(*_) -> None:  # SIGTERM ends like Ctrl-C: vLLM (its own process group) goes with us
            stop.set()
            endpoint.wake.set()

        signal.signal(signal.SIGTERM, on_term)
        _say(f"endpoint keeps answering at {endpoint.url} for the keys in LORAFLOW_API_KEYS; Ctrl-C stops it")
        try:
            endpoint.follow(stop)
        except KeyboardInterrupt:
            pass
        finally:
            endpoint.stop()
            _say("stopped")


@app.command()
def run(params: str = ParamsOpt,
        as_json: bool = typer.Option(False, "--json", help="print the whole run summary as JSON (for scripts)")) -> None:
    """Run the Prefect flow `retrain` (unchanged DVC stages are skipped; a running `loraflow serve` follows
    the alias by itself)."""
    _params(params, training=True)
    from flows.retrain import retrain

    summary = retrain(params_file=params)
    if as_json:
        import json

        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    for stage, r in summary.get("stages", {}).items():
        typer.echo(f"stage {stage:<11} {'ran' if r['ran'] else 'unchanged (skipped)':<20} {r['seconds']:>7.1f}s")
    if summary.get("message"):
        typer.echo(summary["message"])
    else:
        champ = summary.get("champion")
        typer.echo(f"{summary['model_name']} v{summary['registered_version']}: {summary['note']}; "
                   + (f"@{champ['alias']} = v{champ['version']}" if champ else "no champion"))
        for reason in summary.get("decision", {}).get("reasons", []):
            typer.echo(f"  {reason}")


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
    from pipeline.data.engine import EngineError, open_engine

    cfg = p.sanitize
    try:
        ref = index_from_file(reference, cfg) if reference else None
        with open_engine(cfg) as engine:  # sanitize.engine: dask runs the per-record work on the cluster
            report = sanitize_files(list(inputs), out, cfg, task=build_task(p.task), reference=ref, progress=_say,
                                    engine=engine)
    except (NoValidRecords, FileNotFoundError, UnsupportedInput, EngineError) as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(1) from None
    q, d = report["quarantined"], report["duplicates"]
    typer.echo(f"read {report['read']} = kept {report['kept']} + quarantined {q['total']} + duplicates {d['total']}"
               f"; redactions {report['redactions']['by_type']}; quarantine reasons {q['by_reason']}")
    typer.echo(f"wrote {out}/clean.jsonl, quarantine.jsonl, report.json, data_card.md")


@app.command()
def profile(name: str = typer.Argument(..., help="a profile under profiles/ (gpu) or a YAML file's path"),
            params: str = ParamsOpt) -> None:
    """Write a profile's settings into params.yaml (comments and other keys kept), e.g. `loraflow profile gpu`
    on a CUDA machine; DVC then re-runs the stages whose parameters it changed."""
    from pipeline.config import ConfigError, apply_profile

    path = Path(name) if name.endswith((".yaml", ".yml")) else Path("profiles") / f"{name}.yaml"
    try:
        changed = apply_profile(params, path)
    except ConfigError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(2) from None
    if not changed:
        _say(f"{params} already has every setting of {path}")
    for key in changed:
        _say(f"{params}: {key} set from {path.name}")


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

    from pipeline.serve.endpoint import Endpoint, start_vllm, vllm_key, wait_for_base
    from pipeline.serve.gateway import load_keys

    try:
        keys = load_keys(p.serve.gateway_key_file)
    except ValueError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    stop = threading.Event()
    key = vllm_key(p)
    endpoint = Endpoint(p, None, keys, say=_say, on_reject=_rejected_event, upstream_key=key,
                        on_change=_dossier_refresher(p),
                        webhook_secret=os.environ.get("LORAFLOW_WEBHOOK_SECRET", ""))

    def on_term(*_) -> None:  # SIGTERM (docker stop, systemd, kill) ends like Ctrl-C: our vLLM goes with us
        stop.set()
        endpoint.wake.set()

    signal.signal(signal.SIGTERM, on_term)
    try:
        endpoint.start_gateway()
        _say(f"gateway answering at {endpoint.url} (503 until a version is served)")
        if not wait_for_base(p, stop, _say):
            return
        endpoint.server = start_vllm(p, _say, api_key=key)
        endpoint.attach_backend()
        _register_webhook(p, endpoint.webhook_secret)
        _say(f"serving {endpoint.served()}; following @{p.registry.alias} every {p.serve.poll_interval_s:.0f}s")
        typer.echo(f"endpoint: {endpoint.url}", color=False)  # the line scripts wait for: vLLM is ready
        endpoint.follow(stop)
    except KeyboardInterrupt:
        pass
    finally:
        endpoint.stop()
        _say("stopped")


def _dossier_refresher(p):
    from pipeline.layout import serving_log
    from pipeline.release.dossier import refresher

    return refresher(p.registry, Path("reports/dossier"), serving_log(p), _say)


def _register_webhook(p, secret: str) -> None:
    """Alias moves reach the gateway at once when MLflow is a server (webhooks need one); polling otherwise."""
    if not secret or not p.registry.tracking_uri.startswith(("http://", "https://")):
        return
    from pipeline import registry

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
    from pipeline import registry

    info = registry.promote(p.registry, p.project.name, version)
    typer.echo(f"{info.name}@{p.registry.alias} -> v{info.version}")


@app.command()
def rollback(params: str = ParamsOpt) -> None:
    """Move the champion alias back to the version it pointed at before."""
    p = _params(params)
    from pipeline import registry

    try:
        info = registry.rollback(p.registry, p.project.name)
    except LookupError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{info.name}@{p.registry.alias} -> v{info.version}")


@app.command()
def dossier(model: str = typer.Argument("", help="registered model (default: project.name)"),
            version: int = typer.Argument(0, help="version (default: the alias's)"),
            out: Path = typer.Option(Path("reports/dossier"), help="folder for <model>-v<version>.{html,md}"),
            publish: bool = typer.Option(True, help="also log both files to the version's MLflow run (dossier/)"),
            params: str = ParamsOpt) -> None:
    """Write the compliance dossier of a registered version (EU AI Act Annex IV headings), from the
    registry's records and the serving log."""
    p = _params(params)
    from pipeline.layout import serving_log
    from pipeline.release import dossier as doc

    name = model or p.project.name
    try:
        write = doc.publish if publish else doc.write
        md, page, *_ = write(p.registry, name, version or None, out, serving_log(p))
    except LookupError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{page}\n{md}")


@app.command()
def drift(params: str = ParamsOpt) -> None:
    """Run the Prefect flow `drift-check` on the logged serving traffic."""
    _params(params)
    from flows.monitor import drift_check

    r = drift_check(params_file=params)
    if r["status"] != "ok":
        typer.echo(f"no verdict: {r['requests']} new requests since the last judged window (< monitor.min_requests "
                   f"{r['min_requests']})")
        return
    typer.echo(f"{'DRIFT' if r['drift'] else 'no drift'}: share {r['drift_share']:.2f} (threshold {r['threshold']:.2f}) "
               f"over {r['requests']} requests; drifted: {', '.join(r['drifted']) or 'none'}; report {r['html']} "
               f"(MLflow {r.get('report', '-')})")


@app.command()
def status(params: str = ParamsOpt) -> None:
    """The platform's services and deployments, then each registered version, its gate result, which one
    holds the alias and which one the gateway serves."""
    p = _params(params)
    from flows.platform import platform_of, status as platform_status
    from pipeline import registry

    st = platform_status(platform_of(p, params))
    for svc in st["services"]:
        typer.echo(f"{svc['name']:<15} {'up' if svc['up'] else 'down':<5} {svc['url']:<34} "
                   f"{'pid ' + str(svc['pid']) if svc['pid'] else ''}".rstrip())
    for dep in st["deployments"]:
        typer.echo(f"deployment {dep['name']:<26} next run {dep['next_run'] or '-'}"
                   + (" (paused)" if dep.get("paused") else ""))
    champ = registry.get_alias(p.registry, p.project.name)
    c = registry.client(p.registry)
    versions = c.search_model_versions(f"name = '{p.project.name}'")
    if not versions:
        typer.echo(f"no versions of {p.project.name} registered yet")
    for mv in sorted(versions, key=lambda v: int(v.version)):
        mark = f"@{p.registry.alias}" if champ and int(mv.version) == champ.version else ""
        serving = mv.tags.get("serving_status", "")
        interval = mv.tags.get("gate_interval", "")
        typer.echo(f"v{mv.version:<3} gate_promote={mv.tags.get('gate_promote')} promotion={mv.tags.get('promotion', '-')} "
                   f"{'CI ' + interval + ' ' if interval else ''}commit={mv.tags.get('git_commit', '?')[:12]} "
                   f"{mark} {serving[:100]}".rstrip())
    typer.echo(f"champion: {p.project.name}@{p.registry.alias} = v{champ.version}" if champ
               else f"champion: {p.project.name} has no @{p.registry.alias}")
    if versions:
        for move in registry.reconcile_history(p.registry, p.project.name, write=False)[-5:]:
            frm = f"v{move['from']}" if move.get("from") is not None else "none"
            typer.echo(f"  {move['at']}  {frm} -> v{move['to']}  by {move['by']}")
    if p.curate.enabled:
        from flows.feedback import feedback_progress

        typer.echo(f"feedback loop: {feedback_progress(p)['message']} (a drift-triggered retrain trains "
                   "only with enough; `loraflow run` trains anyway)")
    _served_status(p)


@app.command()
def up(params: str = ParamsOpt) -> None:
    """Start the platform in the background: Prefect server, MLflow server (UI + registry webhooks), a
    Prefect worker serving the project's deployments, and the endpoint. Idempotent."""
    p = _params(params, platform=False, training=True)
    from flows.platform import platform_of, up as platform_up
    from pipeline.platform.supervisor import PlatformError

    plat = platform_of(p, params)
    _say(f"loraflow up: state and logs in {plat.run_dir}")
    try:
        res = platform_up(plat, say=typer.echo)
    except PlatformError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(1) from None
    if p.platform.serve:
        typer.echo(f"client key: LORAFLOW_API_KEYS in {plat.state_dir / 'secrets.env'} (or your own LORAFLOW_API_KEYS)")
    typer.echo(f"from this folder, in any shell: prefect deployment run retrain/production   ({res['seconds']}s)")


@app.command()
def down(params: str = ParamsOpt) -> None:
    """Stop everything `loraflow up` started (vLLM and running flows included); data and secrets stay."""
    p = _params(params, platform=False, training=True)
    from flows.platform import down as platform_down, platform_of

    res = platform_down(platform_of(p, params), say=typer.echo)
    if res["busy_ports"]:
        raise typer.Exit(1)


@app.command()
def service(name: str = typer.Argument(..., help="prefect-server | mlflow | worker | serve"),
            params: str = ParamsOpt) -> None:
    """Run one platform service in the foreground, with the command `loraflow up` uses (docker-compose.yml
    runs these). `worker` first creates the work pool, limit and deployments once the Prefect server answers."""
    p = _params(params, platform=False, training=True)
    from flows.platform import platform_of
    from pipeline.platform.services import SERVICE_NAMES, load_secrets, services

    if name not in SERVICE_NAMES:
        typer.secho(f"error: unknown service {name!r} (one of {', '.join(SERVICE_NAMES)})", fg="red", err=True)
        raise typer.Exit(2)
    plat = platform_of(p, params)
    svc = next(s for s in services(plat, load_secrets(plat.state_dir)) if s.name == name)
    env = {**os.environ, **{k: v for k, v in svc.env.items() if not os.environ.get(k) or k == "PREFECT_HOME"}}
    if name in ("prefect-server", "mlflow") and plat.database_url:
        from pipeline.platform.services import ensure_databases

        created = ensure_databases(plat.database_url)
        if created:
            _say(f"created databases {', '.join(created)}")
    if name == "worker":
        from flows.platform import ensure_prefect_objects, wait_for_prefect

        os.environ.update({k: v for k, v in env.items() if k.startswith(("PREFECT_", "LORAFLOW_"))})
        wait_for_prefect(env["PREFECT_API_URL"], p.platform.startup_timeout_s, _say)
        ensure_prefect_objects(plat, say=_say)
    if name == "serve":
        _run_gateway(p)
        return
    os.execvpe(svc.argv[0], svc.argv, env)


def _served_status(p) -> None:
    """What the running gateway serves under each stable name (needs a client key in LORAFLOW_API_KEYS)."""
    import httpx

    from pipeline.serve.gateway import KEYS_ENV, env_keys

    from pipeline.platform.services import loopback, stored_secrets

    url = f"http://{loopback(p.serve.gateway_host)}:{p.serve.gateway_port}/v1/models"
    # Else the key `loraflow up` generated.
    key = next(iter(env_keys()), "") or stored_secrets(Path(p.platform.state_dir)).get(KEYS_ENV, "").split(",")[0]
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
    try:
        engine = httpx.get(url.replace("/v1/models", "/health"), timeout=5).json().get("engine") or {}
    except (httpx.HTTPError, ValueError):
        engine = {}
    if engine:
        typer.echo(f"vLLM: {'up' if engine.get('up') else 'DOWN'}, restarted {engine.get('restarts', 0)} time(s)"
                   + (f" (last exit code {engine['last_exit']})" if engine.get("last_exit") is not None else "")
                   + (f", {engine['outages']} outage(s) of an attached server" if engine.get("outages") else ""))


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
