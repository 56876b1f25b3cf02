"""The gateway when its upstream misbehaves, and its own limits: every request ends with a clear status,
in the log with its real outcome, and with everything it held released.

The upstream here is a real HTTP server on 127.0.0.1 that fails on purpose (answers too late, breaks a
stream half-way, is not there): vLLM cannot be made to do these deterministically."""

import asyncio
import json
import socket
import time

import httpx
import pytest

from pipeline.config import LimitsConfig, TaskConfig
from pipeline.serve.gateway import GatewayServer, RequestLog, Route, Routes, build_app

KEY = "client-key"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _misbehaving_upstream():
    """/v1/chat/completions: 'slow' in the prompt -> answers after 3 s; a streamed request -> two chunks,
    then the connection breaks; else a normal answer."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route as Endpoint

    async def chat(request):
        body = await request.json()
        if "slow" in body["messages"][0]["content"]:
            await asyncio.sleep(3)
        content = body["messages"][0]["content"]
        if content == "late stream":
            await asyncio.sleep(0.6)  # headers come late: the client is gone before the first byte
        if body.get("stream") and content in ("complete", "endless", "late stream"):
            async def trickle():
                for word in ("Hel", "lo") if content == "complete" else iter(lambda: "more", None):
                    chunk = {"choices": [{"index": 0, "delta": {"content": word}}], "model": body["model"]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                    await asyncio.sleep(0.05)
                yield "data: [DONE]\n\n"
                await asyncio.sleep(1)  # vLLM's stream ends a moment after [DONE]: the client may be gone
                yield "\n"
            return StreamingResponse(trickle(), media_type="text/event-stream")
        if body.get("stream"):
            async def broken():
                for word in ("Hel", "lo"):
                    chunk = {"choices": [{"index": 0, "delta": {"content": word}}], "model": body["model"]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                    await asyncio.sleep(0.05)
                raise ConnectionResetError("vLLM died")  # uvicorn drops the connection mid-body
            return StreamingResponse(broken(), media_type="text/event-stream")
        return JSONResponse({"id": "x", "model": body["model"], "usage": {"prompt_tokens": 1, "completion_tokens": 1},
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]})

    return Starlette(routes=[Endpoint("/v1/chat/completions", chat, methods=["POST"])])


@pytest.fixture
def faulty(tmp_path):
    upstream = GatewayServer(_misbehaving_upstream(), "127.0.0.1", _free_port()).start()
    routes = Routes()
    routes.set(Route("m", "m-v1-abc", 1, TaskConfig(kind="text")))
    log = RequestLog(tmp_path / "req.jsonl", 2**20, 30)
    limits = LimitsConfig(request_timeout_s=1.0, max_body_kb=4, max_tokens=64, max_n=2, requests_per_s=2, burst=3,
                          max_concurrent=2)
    gw = GatewayServer(build_app(routes, f"http://127.0.0.1:{upstream.port}", "k", {KEY, "other-key"}, log,
                                 limits=limits), "127.0.0.1", _free_port()).start()
    yield gw, routes, log
    gw.stop()
    upstream.stop()


def _post(gw, body, key=KEY, **kw):
    return httpx.post(f"{gw.url}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=10, **kw)


def _records(log):
    log.flush()
    return [json.loads(x) for x in log.path.read_text().splitlines()] if log.path.exists() else []


def _wait_free(gw, routes):
    deadline = time.time() + 5
    while (routes.in_flight() or httpx.get(gw.url.removesuffix("/v1") + "/health").json()["in_flight"]) \
            and time.time() < deadline:
        time.sleep(0.05)
    return routes.in_flight(), httpx.get(gw.url.removesuffix("/v1") + "/health").json()["in_flight"]


def test_an_upstream_past_its_deadline_is_a_504_logged_and_released(faulty):
    gw, routes, log = faulty
    r = _post(gw, {**CHAT, "messages": [{"role": "user", "content": "slow please"}]})
    assert r.status_code == 504 and "did not answer within 1s" in r.json()["error"]["message"]
    assert _wait_free(gw, routes) == (0, 0)
    [rec] = _records(log)
    assert rec["status"] == 504 and rec["error"] == "ReadTimeout"


def test_a_stream_that_breaks_half_way_ends_with_an_error_event_and_is_not_logged_as_200(faulty):
    gw, routes, log = faulty
    with httpx.stream("POST", f"{gw.url}/chat/completions", json={**CHAT, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=10) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200  # the headers were sent before the upstream broke
    assert [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:2]] == ["Hel", "lo"]
    assert json.loads(events[-1][6:])["error"]["code"] == "upstream_error"
    assert _wait_free(gw, routes) == (0, 0)
    [rec] = _records(log)
    assert rec["status"] == 502 and rec["response"] == "Hello" and rec["error"] == "RemoteProtocolError"


@pytest.mark.parametrize("content, status, response", [("complete", 200, "Hello"), ("endless", 499, "more")])
def test_a_client_that_hangs_up_is_a_499_unless_it_had_the_whole_answer(faulty, content, status, response):
    """The openai client closes the connection as soon as it reads [DONE]: that request was served in
    full (200). One that leaves mid-answer is a 499 with what it was sent."""
    gw, routes, log = faulty
    body = {**CHAT, "stream": True, "messages": [{"role": "user", "content": content}]}
    with httpx.stream("POST", f"{gw.url}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=10) as r:
        for line in r.iter_lines():
            if line == "data: [DONE]" or (content == "endless" and line.startswith("data: ")):
                break  # and hang up, with the upstream still streaming
    assert _wait_free(gw, routes) == (0, 0)
    deadline = time.time() + 5
    while not _records(log) and time.time() < deadline:
        time.sleep(0.05)
    [rec] = _records(log)
    assert rec["status"] == status and rec["response"].startswith(response), rec


def test_a_client_gone_before_the_first_byte_releases_everything(tmp_path):
    """A stream whose client left while the gateway waited for vLLM's headers. uvicorn (ASGI 2.3) then
    answers ``receive`` with ``http.disconnect`` and Starlette cancels the response before it starts the
    body, so the relay's own cleanup never ran: the key's slot, the route's in-flight count and the upstream
    connection stayed held. Driven here through the app's ASGI interface exactly as uvicorn drives it, against
    the real upstream; now released and logged as a 499."""
    upstream = GatewayServer(_misbehaving_upstream(), "127.0.0.1", _free_port()).start()
    routes = Routes()
    routes.set(Route("m", "m-v1-abc", 1, TaskConfig(kind="text")))
    log = RequestLog(tmp_path / "req.jsonl", 2**20, 30)
    app = build_app(routes, f"http://127.0.0.1:{upstream.port}", "k", {KEY}, log,
                    limits=LimitsConfig(request_timeout_s=5.0))
    body = json.dumps({**CHAT, "stream": True, "messages": [{"role": "user", "content": "late stream"}]}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "server": ("127.0.0.1", 1), "client": ("127.0.0.1", 2),
             "headers": [(b"authorization", f"Bearer {KEY}".encode()), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    sent: list[dict] = []

    async def drive() -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop(0)
            await asyncio.sleep(0)
            return {"type": "http.disconnect"}  # the client is gone

        async def send(message):
            await asyncio.sleep(0.01)  # a socket write yields to the loop
            sent.append(message)

        await app(scope, receive, send)

    try:
        asyncio.run(drive())
        health = {}

        async def probe():
            nonlocal health
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
                health = (await c.get("/health")).json()

        asyncio.run(probe())
        assert (routes.in_flight(), health["in_flight"]) == (0, 0)
        log.flush()
        [rec] = _records(log)
        assert rec["status"] == 499, rec
    finally:
        upstream.stop()


def test_an_unreachable_upstream_is_a_503_with_retry_after(tmp_path):
    routes = Routes()
    routes.set(Route("m", "m-v1-abc", 1, TaskConfig(kind="text")))
    log = RequestLog(tmp_path / "req.jsonl", 2**20, 30)
    gw = GatewayServer(build_app(routes, f"http://127.0.0.1:{_free_port()}", "k", {KEY}, log), "127.0.0.1",
                       _free_port()).start()
    try:
        r = _post(gw, CHAT)
        assert r.status_code == 503 and r.headers["Retry-After"] == "5"
        assert _wait_free(gw, routes) == (0, 0) and _records(log)[0]["status"] == 503
    finally:
        gw.stop()


@pytest.mark.parametrize("body, status, says", [
    ({**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}, 413, "larger than 4 KB (serve.limits.max_body_kb)"),
    ({**CHAT, "max_tokens": 100000}, 400, "'max_tokens' is 100000, above this endpoint's limit of 64"),
    ({**CHAT, "max_completion_tokens": 65}, 400, "limit of 64 (serve.limits.max_tokens)"),
    ({**CHAT, "n": 3}, 400, "'n' is 3, above this endpoint's limit of 2 (serve.limits.max_n)"),
])
def test_each_limit_is_refused_with_its_setting_before_the_upstream(faulty, body, status, says):
    gw, routes, log = faulty
    r = _post(gw, body)
    assert r.status_code == status and says in r.json()["error"]["message"]
    [rec] = _records(log)  # accounted for in the log, with why; it never reached the upstream
    assert rec["status"] == status and rec["error"] in ("body_too_large", "invalid_request") and "version" not in rec
    assert _wait_free(gw, routes) == (0, 0)


def test_one_key_over_its_rate_gets_429_and_the_others_are_served(faulty):
    gw, routes, log = faulty
    codes = [_post(gw, CHAT).status_code for _ in range(5)]
    assert codes[:3] == [200, 200, 200] and 429 in codes[3:]  # burst 3, then 2 per second
    refused = _post(gw, CHAT)
    if refused.status_code == 429:
        assert int(refused.headers["Retry-After"]) >= 1 and "rate limit" in refused.json()["error"]["message"]
    assert _post(gw, CHAT, key="other-key").status_code == 200  # another client is not slowed
    time.sleep(1.1)
    assert _post(gw, CHAT).status_code == 200  # the bucket refills
    assert sorted(r["status"] for r in _records(log)) == sorted([*codes, refused.status_code, 200, 200])


def test_requests_in_flight_per_key_are_capped(faulty):
    gw, routes, log = faulty
    import concurrent.futures

    slow = {**CHAT, "messages": [{"role": "user", "content": "slow"}]}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(_post, gw, slow) for _ in range(3)]
        codes = sorted(f.result().status_code for f in futures)
    assert codes == [429, 504, 504]  # two in flight (max_concurrent 2), the third refused at once
    assert _wait_free(gw, routes) == (0, 0)


def test_log_retention_runs_on_a_timer_not_only_on_rotation(tmp_path):
    log = RequestLog(tmp_path / "req.jsonl", 2**30, retention_days=1, rotate_hours=1, check_s=3600)
    log.write({"ts": "2026-01-01T00:00:00+00:00", "model": "m", "prompt": "old", "response": ""})
    log.flush()
    start = log.path.stat().st_mtime
    log.enforce_retention(now=start + 2 * 3600)  # the live file is older than rotate_hours: rotated
    assert not log.path.exists() and len(log.rotated()) == 1
    log.enforce_retention(now=start + 2 * 86400)  # and deleted once past retention, with no new traffic
    assert log.rotated() == []
