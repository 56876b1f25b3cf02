"""The ASGI app behind the one endpoint: authentication and limits first, then the route, then vLLM;
every request ends in the log with its real outcome. ``GatewayServer`` runs it in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import threading
import time
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path

import httpx
from starlette.responses import StreamingResponse

from pipeline.config import CurateConfig, LimitsConfig
from pipeline.io import LogError, log_files
from pipeline.serve.gateway.auth import KeyLimiter, key_id
from pipeline.serve.gateway.requestlog import RequestLog
from pipeline.serve.gateway.routes import Routes
from pipeline.serve.gateway.upstreams import Upstreams
from pipeline.serve.gateway.webhooks import verify_webhook
from pipeline.serve.vllm import generation_defaults


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


def _messages(body: dict) -> list[dict[str, str]]:
    """The request as chat messages (what curation turns into a training record with the corrected
    answer); a completions prompt is one user message."""
    if "messages" not in body:
        prompt = body.get("prompt")
        return [{"role": "user", "content": prompt if isinstance(prompt, str) else json.dumps(prompt)}]
    out = []
    for m in body["messages"]:
        content = m.get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append({"role": str(m.get("role")), "content": str(content or "")})
    return out


FEEDBACK_KEYS = ("id", "thumbs", "score", "correction", "comment")
ISSUED_IDS = 100_000  # response ids remembered in memory; older ones are found in the request log


def feedback_problem(body: object, curate: CurateConfig) -> str | None:
    """Why ``body`` is not a feedback we store, or None."""
    if not isinstance(body, dict):
        return "the feedback body must be a JSON object"
    unknown = sorted(set(body) - set(FEEDBACK_KEYS))
    if unknown:
        return f"unknown field(s) {unknown}; a feedback has {', '.join(FEEDBACK_KEYS)}"
    if not isinstance(body.get("id"), str) or not body["id"]:
        return "'id' is required: the id of the response (the 'id' field of the completion)"
    if not any(body.get(k) is not None for k in FEEDBACK_KEYS[1:]):
        return "give at least one of 'thumbs', 'score', 'correction', 'comment'"
    if body.get("thumbs") is not None and body["thumbs"] not in ("up", "down"):
        return "'thumbs' must be \"up\" or \"down\""
    score = body.get("score")
    low, high = curate.score_range
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                              or not low <= score <= high):
        return f"'score' must be a number in [{low:g}, {high:g}] (curate.score_range)"
    for k in ("correction", "comment"):
        if body.get(k) is not None and (not isinstance(body[k], str) or not body[k].strip()):
            return f"'{k}' must be a non-empty string"
    return None


def response_id(chat: bool, now: float | None = None) -> str:
    """A new response id: ``chatcmpl-`` / ``cmpl-``, the issue time (hex seconds) and 16 random hex digits.
    The time says which log files can hold it (``find_issued``), so a lookup reads one or two files."""
    return f"{'chatcmpl-' if chat else 'cmpl-'}{int(time.time() if now is None else now):x}-{secrets.token_hex(8)}"


def _issued_at(rid: str) -> float | None:
    """The issue time in a response id of ours, or None (an id of another shape: every file is searched)."""
    stamp, sep, rest = rid.partition("-")[2].partition("-")
    try:
        return float(int(stamp, 16)) if sep and len(rest) == 16 else None
    except ValueError:
        return None


def find_issued(request_log: Path, rid: str) -> dict | None:
    """The logged request with response id ``rid``, or None. A request is logged when it ends, after it was
    issued, so it lies in the first file rotated after its issue time or a later one: only those are read
    (oldest first). Damage in them is a ``LogError`` (the caller answers 503), never "not found"."""
    from pipeline.io import read_log

    files = log_files(request_log)
    issued_at = _issued_at(rid)
    if issued_at is not None:
        def rotated_at(f: Path) -> float:
            stamp = f.name[len(request_log.stem) + 1:-len(request_log.suffix) or None]
            try:
                return datetime.strptime(stamp, "%Y%m%dT%H%M%S%f").replace(tzinfo=timezone.utc).timestamp()
            except ValueError:
                return float("inf")  # the live file, or a name of another shape: look in it
        files = [f for f in files if f == request_log or rotated_at(f) >= issued_at - 1]
    for _, _, rec in read_log(request_log, files=files, contains=json.dumps(rid).encode()):
        if rec.get("id") == rid:
            return rec
    return None


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


def build_app(routes: Routes, upstream_url: str | list[str], upstream_key: str, keys: set[str], log: RequestLog,
              timeout_s: float | None = None, webhook_secret: str = "", on_alias=None,
              known: frozenset[str] = frozenset(), limits: LimitsConfig | None = None, engine: dict | None = None,
              feedback: RequestLog | None = None, curate: CurateConfig | None = None):
    """The Starlette app: /v1/models, /v1/chat/completions, /v1/completions, /health, and /hooks/mlflow
    (MLflow registry webhooks, HMAC-verified; only with a ``webhook_secret``): ``on_alias(name, alias,
    version)`` runs for every authentic alias event. ``known``: names this endpoint serves once a version is
    loaded (503 with Retry-After until then, instead of 404). ``limits``: what one client key may ask
    (body size, max_tokens, n, rate, requests in flight, the upstream deadline).

    Every answer carries an ``id`` of ours (the OpenAI ``id`` field, in each stream chunk too), logged with
    the request and the client key's ``key_id``. ``POST /v1/feedback`` (needs ``feedback``, the feedback
    log) takes that id with a thumbs up/down, a score in ``curate.score_range``, a corrected answer (checked
    by the served task's parser) and/or a comment, from the key that got the answer; anything else is a 4xx
    and nothing is stored.

    Every request that passed authentication ends in the log with its real outcome, and releases what it
    took (the adapter's in-flight count, the key's slot, the upstream connection) whatever the upstream does:
    unreachable -> 503, deadline passed -> 504, reset or broken body -> 502, a stream that breaks half-way ->
    a final ``error`` event and the log's status 502/504, a client that hangs up -> 499.
    """
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route as Endpoint

    limits = limits or LimitsConfig()
    timeout_s = timeout_s or limits.request_timeout_s
    limiter = KeyLimiter(limits)
    curate = curate or CurateConfig()
    key_bytes = [k.encode() for k in keys]
    key_ids = {k: key_id(k) for k in keys}  # what the logs name a key by, hashed once
    issued: OrderedDict[str, dict] = OrderedDict()  # response id -> who got it, from which model and version
    issued_lock = threading.Lock()
    parsers: dict = {}  # (model, version) -> the served task's parser, for corrected answers

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

    upstreams = Upstreams([upstream_url] if isinstance(upstream_url, str) else upstream_url, upstream_key,
                          timeout_s)

    async def health(request):
        return JSONResponse({"status": "ok", "models": len(routes.all()), "in_flight": limiter.in_flight(),
                             **({"engine": engine} if engine is not None else {}),
                             **({"replicas": upstreams.status()} if len(upstreams.urls) > 1 else {})})

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

    async def json_body(request, what: str) -> tuple[object, tuple[int, str, str] | None]:
        """The parsed body, or why it is refused: larger than the limit (413, read no further) or not JSON."""
        raw = await read_body(request)
        if raw is None:
            return None, (413, f"the {what} body is larger than {limits.max_body_kb} KB (serve.limits.max_body_kb)",
                          "body_too_large")
        try:
            return json.loads(raw), None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return None, (400, f"the {what} body is not valid JSON: {e}", "invalid_json")

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
        # What this request holds until it ends: the key's slot, the route, the replica it went to.
        ticket = {"key": None if wait else key, "route": None, "replica": None}

        def release() -> None:
            if ticket["replica"] is not None:
                upstreams.done(ticket["replica"])
                ticket["replica"] = None
            if ticket["key"] is not None:
                limiter.done(ticket["key"])
                ticket["key"] = None
            if ticket["route"] is not None:
                routes.release(ticket["route"])
                ticket["route"] = None

        def refuse(status: int, message: str, code: str, body: object = None, retry_after: float | None = None):
            """Refused before reaching vLLM: released, and in the log with the reason (never as traffic: drift
            reads answered requests only)."""
            release()
            model = body.get("model") if isinstance(body, dict) else None
            log.write({"ts": datetime.now(timezone.utc).isoformat(), "model": str(model) if model else None,
                       "endpoint": "chat" if chat else "completions", "status": status, "error": code,
                       "prompt": _prompt_text(body) if isinstance(body, dict) and not _validate(body, chat) else "",
                       "response": ""})
            return refused(status, message, code, retry_after)

        try:
            body, bad = await json_body(request, "request")
            if bad:
                return refuse(*bad)
            if wait:
                return refuse(429, why, "rate_limited", body, wait)
            problem = _validate(body, chat, limits)
            if problem:
                return refuse(400, problem, "invalid_request", body)
            route = ticket["route"] = routes.acquire(body["model"])
        except BaseException:
            release()
            raise
        if route is None:
            if body["model"] in known:
                return refuse(503, f"the model '{body['model']}' has no version loaded yet (starting, or its base "
                                   "model is being swapped); retry shortly", "model_not_ready", body, 10)
            return refuse(404, f"the model '{body['model']}' does not exist; GET /v1/models lists the served names",
                          "model_not_found", body)
        for k, value in generation_defaults(route.task).items():
            body.setdefault(k, value)
        if isinstance(body.get("max_tokens"), int):  # the task's default may exceed the endpoint's ceiling
            body["max_tokens"] = min(body["max_tokens"], limits.max_tokens)
        body["model"] = route.internal
        started = time.perf_counter()
        rid = response_id(chat)
        record = {"ts": datetime.now(timezone.utc).isoformat(), "id": rid, "key_id": key_ids[key],
                  "model": route.name, "version": route.version,
                  "adapter": route.internal, "endpoint": "chat" if chat else "completions",
                  "stream": bool(body.get("stream")), "prompt": _prompt_text(body), "messages": _messages(body)}
        with issued_lock:
            issued[rid] = {"key_id": record["key_id"], "model": route.name, "version": route.version,
                           "task": route.task}
            while len(issued) > ISSUED_IDS:
                issued.popitem(last=False)

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

        # Which registered version answered (clients and audits can tell a swap happened).
        served_by = {"X-Loraflow-Version": str(route.version), "X-Loraflow-Request-Id": rid}
        path = "/v1/chat/completions" if chat else "/v1/completions"
        try:
            tries = upstreams.order()
            for n, i in enumerate(tries):
                pool = ticket["replica"] = upstreams.take(i)  # released by the replica's pool
                record["replica"] = i
                client = upstreams.client(pool)
                try:
                    upstream = await client.send(client.build_request("POST", path, json=body), stream=True)
                    break
                except httpx.ConnectError:
                    # Nothing reached this replica: another may answer. The last one's error is the client's.
                    upstreams.refused(i)
                    upstreams.done(pool)
                    ticket["replica"] = None
                    if n == len(tries) - 1:
                        raise
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
                data["id"] = rid  # ours: what POST /v1/feedback takes
            text = ""
            if upstream.status_code == 200 and isinstance(data, dict):
                choice = (data.get("choices") or [{}])[0]
                text = (choice.get("message") or {}).get("content") or choice.get("text") or ""
            finish(upstream.status_code, text, data.get("usage") if isinstance(data, dict) else None)
            return JSONResponse(data, status_code=upstream.status_code, headers=served_by)

        async def relay():
            pieces: list[str] = []
            usage = None
            outcome: tuple[int, str] = (200, "")
            done = False  # vLLM's [DONE] went out: the client has the whole answer
            try:
                async for line in upstream.aiter_lines():
                    done = done or line == "data: [DONE]"
                    if line.startswith("data: ") and line != "data: [DONE]":
                        try:
                            chunk = json.loads(line[6:])
                            chunk["model"] = route.name
                            chunk["id"] = rid
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
                # A client that closes the connection once it read [DONE] (the openai client does) was
                # served in full; only one that left before it is a 499.
                outcome = (200, "") if done else (499, type(e).__name__)
                raise
            finally:
                await upstream.aclose()
                finish(outcome[0], "".join(pieces), usage, outcome[1])

        async def abandon() -> None:
            """The response never started (the client left before the first byte): the relay's own cleanup
            never ran, so release here. Idempotent with it (``finish`` runs once)."""
            finish(499, "", None, "disconnected")  # releases first: closing the upstream may fail
            with contextlib.suppress(Exception):
                await upstream.aclose()

        return _Relay(relay(), abandon, media_type="text/event-stream", headers=served_by)

    def parser_for(model: str, version, task_cfg):
        from pipeline.tasks import build_task

        if (model, version) not in parsers:
            parsers[(model, version)] = build_task(task_cfg)
        return parsers[(model, version)]

    async def post_feedback(request):
        key = key_of(request)
        if key is None:
            return _error(401, "invalid or missing API key", "invalid_api_key")
        if feedback is None:
            return _error(404, "feedback is not enabled on this endpoint", "not_found")
        wait, why = limiter.admit(key)
        if wait:
            return refused(429, why, "rate_limited", wait)
        try:
            body, bad = await json_body(request, "feedback")
            if bad:
                return refused(*bad)
            problem = feedback_problem(body, curate)
            if problem:
                return refused(400, problem, "invalid_feedback")
            with issued_lock:
                origin = issued.get(body["id"])
            if origin is None:
                try:
                    logged = await asyncio.to_thread(find_issued, log.path, body["id"])
                except (OSError, LogError) as e:  # could not read is not "absent": the client retries
                    return refused(503, f"the request log cannot be read to find {body['id']!r} ({e}); retry "
                                        "later", "log_unreadable", 30)
                if logged is not None:
                    route = routes.get(str(logged.get("model")))
                    origin = {"key_id": logged.get("key_id"), "model": logged.get("model"),
                              "version": logged.get("version"), "task": route.task if route else None}
            if origin is None or origin["key_id"] != key_ids[key]:
                return refused(404, f"no response with id {body['id']!r} was served to this key (ids are kept "
                                    "as long as the request log keeps them: serve.log_retention_days)",
                               "unknown_id")
            if body.get("correction") is not None:
                if origin["task"] is None:
                    return refused(503, f"the model {origin['model']!r} is not served right now, so its task "
                                        "cannot check the corrected answer; retry later", "model_not_ready", 10)
                why_not = parser_for(origin["model"], origin["version"], origin["task"]).check_reference(
                    body["correction"])
                if why_not:
                    return refused(400, f"the corrected answer does not fit the task: {why_not}",
                                   "invalid_correction")
            entry = {"ts": datetime.now(timezone.utc).isoformat(), "id": body["id"], "key_id": origin["key_id"],
                     "model": origin["model"], "version": origin["version"],
                     **{k: body[k] for k in FEEDBACK_KEYS[1:] if body.get(k) is not None}}
            try:
                await asyncio.to_thread(feedback.append, entry)  # on disk before we say it is stored
            except OSError as e:
                return refused(503, f"the feedback was not stored ({e.strerror or e}); retry later",
                               "feedback_not_stored", 30)
            return JSONResponse({"id": body["id"], "stored": sorted(k for k in FEEDBACK_KEYS[1:] if k in entry)})
        finally:
            limiter.done(key)

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
        await upstreams.aclose()

    return Starlette(lifespan=lifespan, routes=[
        Endpoint("/health", health, methods=["GET"]),
        Endpoint("/v1/models", models, methods=["GET"]),
        Endpoint("/v1/chat/completions", completions, methods=["POST"]),
        Endpoint("/v1/completions", completions, methods=["POST"]),
        Endpoint("/v1/feedback", post_feedback, methods=["POST"]),
        Endpoint("/hooks/mlflow", webhook, methods=["POST"]),
    ])


class _Relay(StreamingResponse):
    """A stream whose cleanup runs on every path. Starlette only closes a body iterator it started: a client
    that disconnects before the first byte would leave the upstream connection, the key's slot and the
    route's in-flight count held for good. ``on_abandon`` runs whenever the response ends (after the
    relay's own ``finally`` where the relay started; ``finish`` is once-only, so it is a no-op then)."""

    def __init__(self, content, on_abandon, **kw):
        super().__init__(content, **kw)
        self._gen, self._on_abandon = content, on_abandon

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(BaseException):
                await self._gen.aclose()  # runs the relay's finally if it started, nothing otherwise
            await asyncio.shield(self._on_abandon())


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
