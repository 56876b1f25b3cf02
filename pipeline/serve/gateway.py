"""The one endpoint clients call: an authenticated OpenAI-compatible gateway in front of vLLM.

Clients use stable model names (the registered model's name); the gateway maps each to the internal
adapter name vLLM serves right now, fills the generation settings the client left out from the task's
config (the behaviour the gate measured), forwards the request with vLLM's own key (vLLM listens on
127.0.0.1 only), streams the answer back and appends a PII-redacted record of every request to a rotated
log. Refused requests (no or bad key: 401, unknown model: 404, malformed body: 400) never reach vLLM.

A small gateway of our own rather than an existing proxy (LiteLLM and the like): it must share the
pipeline's PII redactor and task configs, switch routes atomically when the registry's alias moves, and
count in-flight requests per adapter so an old adapter is unloaded only once they finished; a proxy would
need all of that bolted on through its plugin API and brings a large dependency set of its own.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx

from pipeline.config import LimitsConfig, TaskConfig
from pipeline.pii import Redactor, build_redactor
from pipeline.io import rotated_files
from pipeline.serve.vllm import generation_defaults

KEYS_ENV = "LORAFLOW_API_KEYS"


def env_keys() -> list[str]:
    """Client keys in ``LORAFLOW_API_KEYS`` (comma-separated), in order."""
    return [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]


def load_keys(key_file: str = "") -> set[str]:
    """Client keys from ``LORAFLOW_API_KEYS`` or a key file (one per line)."""
    keys = set(env_keys())
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise ValueError(f"serve.gateway_key_file: {key_file} does not exist")
        keys |= {line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}
    if not keys:
        raise ValueError(f"no client API keys: set {KEYS_ENV} (comma-separated) or serve.gateway_key_file; "
                         "the gateway never runs unauthenticated")
    return keys


@dataclass(frozen=True)
class Route:
    name: str        # what clients send
    internal: str    # the adapter name inside vLLM (fresh for every load)
    version: int
    task: TaskConfig


class Routes:
    """Stable name -> the route serving it; swaps are atomic, in-flight requests are counted per adapter."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._routes: dict[str, Route] = {}
        self._inflight: dict[str, int] = {}

    def get(self, name: str) -> Route | None:
        with self._lock:
            return self._routes.get(name)

    def all(self) -> list[Route]:
        with self._lock:
            return sorted(self._routes.values(), key=lambda r: r.name)

    def clear(self) -> None:
        """Forget every route (the vLLM behind them restarts); in-flight counts drain on their own."""
        with self._lock:
            self._routes.clear()

    def set(self, route: Route) -> Route | None:
        with self._lock:
            previous = self._routes.get(route.name)
            self._routes[route.name] = route
            return previous

    def acquire(self, name: str) -> Route | None:
        with self._lock:
            route = self._routes.get(name)
            if route is not None:
                self._inflight[route.internal] = self._inflight.get(route.internal, 0) + 1
            return route

    def release(self, route: Route) -> None:
        with self._lock:
            self._inflight[route.internal] -= 1

    def in_flight(self) -> int:
        with self._lock:
            return sum(self._inflight.values())

    def wait_drained(self, internal: str, timeout_s: float = 300) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._inflight.get(internal):
                    self._inflight.pop(internal, None)
                    return True
            time.sleep(0.05)
        return False


class RequestLog:
    """Append-only JSONL of every request, PII-redacted before it is written, rotated by size and age.

    The live file is ``path``; a full one, or one older than ``rotate_hours``, is renamed
    ``<stem>.<UTC time>.jsonl``, and rotated files whose newest record is older than ``retention_days`` are
    deleted. Retention runs on a timer (every ``check_s``), so at low traffic no record outlives
    retention + rotate_hours. Raw text is only ever in memory.
    """

    def __init__(self, path: Path, max_bytes: int, retention_days: float, redactor: Redactor | None = None,
                 rotate_hours: float = 24.0, check_s: float = 60.0):
        """``redactor``: the sanitizer's (``build_redactor(p.sanitize)``, custom patterns included), so the
        log keeps nothing that training data would not."""
        self.path, self.max_bytes, self.retention = path, max_bytes, timedelta(days=retention_days)
        self.rotate_after_s = rotate_hours * 3600
        self._redactor = redactor or build_redactor()
        self._lock = threading.Lock()
        # Redaction and disk writes happen on a writer thread, off the request path.
        self._queue: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True, name="loraflow-request-log").start()
        self._stop = threading.Event()
        threading.Thread(target=self._timer, args=(check_s,), daemon=True, name="loraflow-log-retention").start()

    def _timer(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.enforce_retention()
            except OSError as e:  # a full or read-only disk must not kill serving; say so
                print(f"warning: request log {self.path}: retention: {e}", flush=True)

    def enforce_retention(self, now: float | None = None) -> None:
        """Rotate the live file once it is older than ``rotate_hours``, delete rotated files past retention."""
        now = time.time() if now is None else now
        with self._lock:
            started = self._started()
            if started is not None and now - started > self.rotate_after_s:
                self._rotate()
            self._expire(now)

    def _started(self) -> float | None:
        """When the live file's first record was written (its first line's ``ts``), or None."""
        try:
            with open(self.path, encoding="utf-8") as fh:
                first = fh.readline()
            return datetime.fromisoformat(json.loads(first)["ts"]).timestamp()
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _rotate(self) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        self.path.rename(self.path.with_name(f"{self.path.stem}.{stamp}{self.path.suffix}"))

    def close(self) -> None:
        self._stop.set()

    def redact(self, text: str) -> str:
        return self._redactor.redact(text)[0]

    def write(self, record: dict) -> None:
        """Queue ``record``; it is redacted and appended shortly after (``flush`` waits for that)."""
        self._queue.put(record)

    def flush(self) -> None:
        self._queue.join()

    def _drain(self) -> None:
        while True:
            record = self._queue.get()
            try:
                self._append(record)
            except Exception as e:  # noqa: BLE001 - a full disk must not kill serving; say so instead
                print(f"warning: request log {self.path}: {e}", flush=True)
            finally:
                self._queue.task_done()

    def _append(self, record: dict) -> None:
        record = {**record, "prompt": self.redact(record.get("prompt") or ""),
                  "response": self.redact(record.get("response") or "")}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size + len(line) > self.max_bytes:
                self._rotate()
                self._expire()
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)

    def rotated(self) -> list[Path]:
        return rotated_files(self.path)

    def _expire(self, now: float | None = None) -> None:
        cutoff = (time.time() if now is None else now) - self.retention.total_seconds()
        for f in self.rotated():
            if f.stat().st_mtime < cutoff:
                f.unlink(missing_ok=True)


def _error(status: int, message: str, code: str):
    from starlette.responses import JSONResponse

    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error"}.get(
        status, "api_error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)


def _prompt_text(body: dict) -> str:
    """The prompt as drift monitoring compares it with training prompts: message contents, one per line."""
    if "messages" in body:
        parts = []
        for m in body["messages"]:
            content = m.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(str(content or ""))
        return "\n".join(parts)
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


class KeyLimiter:
    """Per client key: a token bucket (``requests_per_s`` sustained, ``burst`` at once) and a cap on requests
    in flight, so one client cannot starve the others. ``admit`` says how long to wait (0: go ahead)."""

    def __init__(self, limits: LimitsConfig) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key digest -> (tokens, last refill time)
        self._inflight: dict[str, int] = {}

    def admit(self, key: str) -> tuple[float, str]:
        """(seconds to wait before retrying, why) when refused; (0, "") when admitted (then ``done`` later)."""
        now = time.monotonic()
        with self._lock:
            if self._inflight.get(key, 0) >= self.limits.max_concurrent:
                return 1.0, f"more than {self.limits.max_concurrent} requests in flight for this key"
            tokens, last = self._buckets.get(key, (float(self.limits.burst), now))
            tokens = min(float(self.limits.burst), tokens + (now - last) * self.limits.requests_per_s)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return (1.0 - tokens) / self.limits.requests_per_s, (
                    f"rate limit: {self.limits.requests_per_s:g} requests/s per key (burst {self.limits.burst})")
            self._buckets[key] = (tokens - 1.0, now)
            self._inflight[key] = self._inflight.get(key, 0) + 1
            return 0.0, ""

    def done(self, key: str) -> None:
        with self._lock:
            left = self._inflight.get(key, 0) - 1
            if left > 0:
                self._inflight[key] = left
            else:
                self._inflight.pop(key, None)

    def in_flight(self) -> int:
        with self._lock:
            return sum(self._inflight.values())


def _validate(body: object, chat: bool, limits: LimitsConfig | None = None) -> str | None:
    """Why ``body`` is not a request we forward, or None."""
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "'model' is required (a string)"
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                return f"messages[{i}] needs 'role' and 'content'"
    elif not isinstance(body.get("prompt"), (str, list)):
        return "'prompt' is required (a string or a list)"
    for key in ("max_tokens", "max_completion_tokens", "n"):
        if key in body and body[key] is not None and (not isinstance(body[key], int) or body[key] < 1):
            return f"'{key}' must be a positive integer"
    if limits is not None:
        for key, ceiling, setting in (("max_tokens", limits.max_tokens, "max_tokens"),
                                      ("max_completion_tokens", limits.max_tokens, "max_tokens"),
                                      ("n", limits.max_n, "max_n")):
            if isinstance(body.get(key), int) and body[key] > ceiling:
                return f"'{key}' is {body[key]}, above this endpoint's limit of {ceiling} (serve.limits.{setting})"
    return None


WEBHOOK_MAX_AGE_S = 300  # older (or future) MLflow webhook timestamps are replays or clock trouble


def verify_webhook(secret: str, headers, body: bytes, seen: set[str]) -> str | None:
    """Why an MLflow webhook delivery is not authentic, or None. MLflow signs
    ``<delivery id>.<unix time>.<body>`` with HMAC-SHA256 and sends ``X-MLflow-Signature: v1,<base64>``."""
    import base64
    import hashlib

    signature = headers.get("x-mlflow-signature", "")
    delivery = headers.get("x-mlflow-delivery-id", "")
    stamp = headers.get("x-mlflow-timestamp", "")
    if not signature or not delivery or not stamp:
        return "unsigned delivery"
    try:
        age = time.time() - int(stamp)
    except ValueError:
        return "malformed timestamp"
    if abs(age) > WEBHOOK_MAX_AGE_S:
        return f"stale delivery ({age:.0f}s old)"
    version, _, given = signature.partition(",")
    expected = base64.b64encode(hmac.new(secret.encode(), f"{delivery}.{stamp}.".encode() + body,
                                         hashlib.sha256).digest()).decode()
    if version != "v1" or not hmac.compare_digest(given, expected):
        return "bad signature"
    if delivery in seen:
        return "replayed delivery"
    seen.add(delivery)
    return None


def build_app(routes: Routes, upstream_url: str, upstream_key: str, keys: set[str], log: RequestLog,
              timeout_s: float | None = None, webhook_secret: str = "", on_alias=None,
              known: frozenset[str] = frozenset(), limits: LimitsConfig | None = None, engine: dict | None = None):
    """The Starlette app: /v1/models, /v1/chat/completions, /v1/completions, /health, and /hooks/mlflow
    (MLflow registry webhooks, HMAC-verified; only with a ``webhook_secret``): ``on_alias(name, alias,
    version)`` runs for every authentic alias event. ``known``: names this endpoint serves once a version is
    loaded (503 with Retry-After until then, instead of 404). ``limits``: what one client key may ask
    (body size, max_tokens, n, rate, requests in flight, the upstream deadline).

    Every request that passed authentication ends in the log with its real outcome, and releases what it
    took (the adapter's in-flight count, the key's slot, the upstream connection) whatever the upstream does:
    unreachable -> 503, deadline passed -> 504, reset or broken body -> 502, a stream that breaks half-way ->
    a final ``error`` event and the log's status 502/504, a client that hangs up -> 499.
    """
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route as Endpoint

    limits = limits or LimitsConfig()
    timeout_s = timeout_s or limits.request_timeout_s
    limiter = KeyLimiter(limits)
    key_bytes = [k.encode() for k in keys]
    state: dict = {}

    def key_of(request) -> str | None:
        """The client key the request carries, when it is one of ours (constant-time compare per key)."""
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            return None
        given = header[7:].strip().encode()
        for k in key_bytes:
            if hmac.compare_digest(given, k):
                return k.decode()
        return None

    def client() -> httpx.AsyncClient:
        if "client" not in state:
            state["client"] = httpx.AsyncClient(base_url=upstream_url, timeout=timeout_s,
                                                headers={"Authorization": f"Bearer {upstream_key}"})
        return state["client"]

    async def health(request):
        return JSONResponse({"status": "ok", "models": len(routes.all()), "in_flight": limiter.in_flight(),
                             **({"engine": engine} if engine is not None else {})})

    async def models(request):
        if key_of(request) is None:
            return _error(401, "invalid or missing API key", "invalid_api_key")
        return JSONResponse({"object": "list", "data": [
            {"id": r.name, "object": "model", "owned_by": "loraflow", "version": r.version} for r in routes.all()]})

    async def read_body(request) -> bytes | None:
        """The body, or None when it is larger than the limit (read no further than that)."""
        cap = limits.max_body_kb * 1024
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    def refused(status: int, message: str, code: str, retry_after: float | None = None):
        resp = _error(status, message, code)
        if retry_after is not None:
            resp.headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
        return resp

    async def completions(request):
        chat = request.url.path.endswith("/chat/completions")
        key = key_of(request)
        if key is None:
            return _error(401, "invalid or missing API key", "invalid_api_key")
        wait, why = limiter.admit(key)
        if wait:
            return refused(429, why, "rate_limited", wait)
        ticket = {"key": key, "route": None}  # what this request holds until it ends

        def release() -> None:
            if ticket["key"] is not None:
                limiter.done(ticket["key"])
                ticket["key"] = None
            if ticket["route"] is not None:
                routes.release(ticket["route"])
                ticket["route"] = None

        try:
            raw_body = await read_body(request)
            if raw_body is None:
                release()
                return refused(413, f"the request body is larger than {limits.max_body_kb} KB "
                                    "(serve.limits.max_body_kb)", "body_too_large")
            try:
                body = json.loads(raw_body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                release()
                return _error(400, f"the request body is not valid JSON: {e}", "invalid_json")
            problem = _validate(body, chat, limits)
            if problem:
                release()
                return _error(400, problem, "invalid_request")
            route = ticket["route"] = routes.acquire(body["model"])
        except BaseException:
            release()
            raise
        if route is None:
            release()
            if body["model"] in known:
                return refused(503, f"the model '{body['model']}' has no version loaded yet (starting, or its base "
                                    "model is being swapped); retry shortly", "model_not_ready", 10)
            return _error(404, f"the model '{body['model']}' does not exist; GET /v1/models lists the served names",
                          "model_not_found")
        for k, value in generation_defaults(route.task).items():
            body.setdefault(k, value)
        if isinstance(body.get("max_tokens"), int):  # the task's default may exceed the endpoint's ceiling
            body["max_tokens"] = min(body["max_tokens"], limits.max_tokens)
        body["model"] = route.internal
        started = time.perf_counter()
        record = {"ts": datetime.now(timezone.utc).isoformat(), "model": route.name, "version": route.version,
                  "adapter": route.internal, "endpoint": "chat" if chat else "completions",
                  "stream": bool(body.get("stream")), "prompt": _prompt_text(body)}

        def finish(status: int, text: str, usage: dict | None, error: str = "") -> None:
            """Log the outcome and release what the request held: exactly once per request."""
            if ticket.get("logged"):
                return
            ticket["logged"] = True
            release()
            log.write({**record, "status": status, "latency_s": round(time.perf_counter() - started, 4),
                       "prompt_tokens": (usage or {}).get("prompt_tokens"),
                       "completion_tokens": (usage or {}).get("completion_tokens"), "response": text,
                       **({"error": error} if error else {})})

        def upstream_failure(e: BaseException) -> tuple[int, str, str]:
            if isinstance(e, httpx.TimeoutException):
                return 504, f"the model server did not answer within {timeout_s:g}s", "upstream_timeout"
            if isinstance(e, httpx.ConnectError):
                return 503, "the model server is not reachable; retry shortly", "upstream_unavailable"
            return 502, f"the model server broke off the answer ({type(e).__name__})", "upstream_error"

        path = "/v1/chat/completions" if chat else "/v1/completions"
        try:
            upstream = await client().send(client().build_request("POST", path, json=body), stream=True)
        except httpx.HTTPError as e:
            status, message, code = upstream_failure(e)
            finish(status, "", None, type(e).__name__)
            return refused(status, message, code, 5 if status == 503 else None)
        except BaseException as e:
            finish(499, "", None, type(e).__name__)  # the client went away while we waited
            raise

        if not record["stream"] or upstream.status_code != 200:
            try:
                raw = await upstream.aread()
            except httpx.HTTPError as e:
                status, message, code = upstream_failure(e)
                finish(status, "", None, type(e).__name__)
                return refused(status, message, code)
            except BaseException as e:
                finish(499, "", None, type(e).__name__)
                raise
            finally:
                await upstream.aclose()
            try:
                data = json.loads(raw)
            except json.JSONDecodeError:
                finish(upstream.status_code, "", None)
                return Response(raw, status_code=upstream.status_code, media_type="text/plain")
            if isinstance(data, dict) and "model" in data:
                data["model"] = route.name
            text = ""
            if upstream.status_code == 200 and isinstance(data, dict):
                choice = (data.get("choices") or [{}])[0]
                text = (choice.get("message") or {}).get("content") or choice.get("text") or ""
            finish(upstream.status_code, text, data.get("usage") if isinstance(data, dict) else None)
            return JSONResponse(data, status_code=upstream.status_code)

        async def relay():
            pieces: list[str] = []
            usage = None
            outcome: tuple[int, str] = (200, "")
            try:
                async for line in upstream.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        try:
                            chunk = json.loads(line[6:])
                            chunk["model"] = route.name
                            for c in chunk.get("choices") or []:
                                pieces.append((c.get("delta") or {}).get("content") or c.get("text") or "")
                            usage = chunk.get("usage") or usage
                            line = "data: " + json.dumps(chunk, ensure_ascii=False)
                        except json.JSONDecodeError:
                            pass
                    yield line + "\n"
            except httpx.HTTPError as e:  # the stream broke half-way: say so in the stream, log the failure
                status, message, code = upstream_failure(e)
                outcome = (status, type(e).__name__)
                yield "data: " + json.dumps({"error": {"message": message, "type": "api_error", "code": code}}) + "\n\n"
            except BaseException as e:  # the client hung up (or the server is stopping)
                outcome = (499, type(e).__name__)
                raise
            finally:
                await upstream.aclose()
                finish(outcome[0], "".join(pieces), usage, outcome[1])

        return StreamingResponse(relay(), media_type="text/event-stream")

    seen: set[str] = set()

    async def webhook(request):
        if not webhook_secret:
            return _error(404, "webhooks are not enabled (no webhook secret)", "not_found")
        body = await request.body()
        why = verify_webhook(webhook_secret, request.headers, body, seen)
        if why:
            return _error(400 if why.startswith(("stale", "malformed")) else 401, f"webhook rejected: {why}",
                          "invalid_webhook")
        try:
            event = json.loads(body)
            data = event.get("data") or {}
            if event.get("entity") == "model_version_alias" and on_alias is not None:
                on_alias(str(data.get("name")), str(data.get("alias")), int(data.get("version") or 0))
        except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
            return _error(400, f"webhook payload not understood: {e}", "invalid_webhook")
        return JSONResponse({"ok": True})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if "client" in state:
            await state["client"].aclose()

    return Starlette(lifespan=lifespan, routes=[
        Endpoint("/health", health, methods=["GET"]),
        Endpoint("/v1/models", models, methods=["GET"]),
        Endpoint("/v1/chat/completions", completions, methods=["POST"]),
        Endpoint("/v1/completions", completions, methods=["POST"]),
        Endpoint("/hooks/mlflow", webhook, methods=["POST"]),
    ])


class GatewayServer:
    """The gateway in a background thread (uvicorn), stoppable; ``url`` once it answers."""

    def __init__(self, app, host: str, port: int):
        import uvicorn

        self.host, self.port = host, port
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                     access_log=False))
        self._thread = threading.Thread(target=self._server.run, daemon=True, name="loraflow-gateway")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout_s: float = 30) -> "GatewayServer":
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the gateway did not start on {self.host}:{self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
