"""Feedback through the endpoint (POST /v1/feedback) and the curate stage that turns traffic and feedback into
records: ids, keys, the task's parser, PII never on disk, provenance, the held-out share, DPO pairs,
reconciliation, and curated records through sanitize (contamination against eval).

The upstream is a real HTTP server answering like vLLM (tests/test_gateway.py covers vLLM itself)."""

import json
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import openai
import pytest

from pipeline.config import CurateConfig, SanitizeConfig, TaskConfig
from pipeline.curate import curate, held_out
from pipeline.pii import build_redactor
from pipeline.serve.gateway import GatewayServer, RequestLog, Route, Routes, build_app
from pipeline.tasks import build_task

KEY, OTHER = "client-key", "other-key"
SCHEMA = {"type": "object", "properties": {"category": {"enum": ["billing", "shipping", "feature_request"]}},
          "required": ["category"], "additionalProperties": False}
TASK = TaskConfig(kind="json", json_schema=SCHEMA, fields=["category"], max_new_tokens=16)
CUSTOM = {"employee_id": r"\bEMP-\d{5}\b"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _upstream():
    """Answers every chat request with {"category": "billing"}, as vLLM would (its own id included)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route as Endpoint

    async def chat(request):
        body = await request.json()
        answer = json.dumps({"category": "billing"})
        if body.get("stream"):
            async def chunks():
                for part in (answer[:5], answer[5:]):
                    yield "data: " + json.dumps({"id": "vllm-1", "model": body["model"], "choices": [
                        {"index": 0, "delta": {"content": part}}]}) + "\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(chunks(), media_type="text/event-stream")
        return JSONResponse({"id": "vllm-internal-id", "object": "chat.completion", "created": 0,
                             "model": body["model"], "usage": {"prompt_tokens": 3, "completion_tokens": 5},
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": answer}}]})

    return Starlette(routes=[Endpoint("/v1/chat/completions", chat, methods=["POST"])])


@pytest.fixture
def endpoint(tmp_path):
    upstream = GatewayServer(_upstream(), "127.0.0.1", _free_port()).start()
    routes = Routes()
    routes.set(Route("triage", "triage-v3-abc", 3, TASK))
    redactor = build_redactor(SanitizeConfig(custom_pii=CUSTOM))
    log = RequestLog(tmp_path / "serving" / "requests.jsonl", 2**20, 30, redactor)
    feedback = RequestLog(tmp_path / "serving" / "feedback.jsonl", 2**20, 30, redactor,
                          text_fields=("correction", "comment"))
    gw = GatewayServer(build_app(routes, f"http://127.0.0.1:{upstream.port}", "k", {KEY, OTHER}, log,
                                 feedback=feedback, curate=CurateConfig()), "127.0.0.1", _free_port()).start()
    yield gw, log, feedback
    gw.stop()
    upstream.stop()


def _feedback(gw, body, key=KEY):
    return httpx.post(f"{gw.url}/feedback", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_feedback_api(endpoint):
    gw, log, feedback = endpoint
    client = openai.OpenAI(base_url=gw.url, api_key=KEY, max_retries=0)
    msgs = [{"role": "user", "content": "Please add an export to Excel. I'm EMP-12345, call +1 415 555 0134"}]
    answer = client.chat.completions.create(model="triage", messages=msgs)
    rid = answer.id
    assert rid.startswith("chatcmpl-") and rid != "vllm-internal-id"
    streamed_ids = {c.id for c in client.chat.completions.create(model="triage", messages=msgs, stream=True)}
    assert len(streamed_ids) == 1 and streamed_ids != {rid, "vllm-1"} and "vllm-1" not in streamed_ids

    good = _feedback(gw, {"id": rid, "thumbs": "down", "score": 1,
                          "correction": json.dumps({"category": "feature_request"}),
                          "comment": "wrong: I am Jane Miller, EMP-54321, jane@example.com"})
    assert good.status_code == 200, good.text
    assert good.json()["stored"] == ["comment", "correction", "score", "thumbs"]

    refusals = [
        (_feedback(gw, {"id": rid, "thumbs": "up"}, key="wrong"), 401, None),
        (_feedback(gw, {"id": "chatcmpl-000000000000000000000000", "thumbs": "up"}), 404, "unknown_id"),
        (_feedback(gw, {"id": rid, "thumbs": "up"}, key=OTHER), 404, "unknown_id"),  # another key's answer
        (_feedback(gw, {"id": rid}), 400, "invalid_feedback"),
        (_feedback(gw, {"id": rid, "thumbs": "sideways"}), 400, "invalid_feedback"),
        (_feedback(gw, {"id": rid, "score": 9}), 400, "invalid_feedback"),
        (_feedback(gw, {"id": rid, "score": True}), 400, "invalid_feedback"),
        (_feedback(gw, {"id": rid, "rating": 5}), 400, "invalid_feedback"),
        (_feedback(gw, {"id": rid, "correction": '{"category": "refund"}'}), 400, "invalid_correction"),
        (_feedback(gw, {"id": rid, "correction": "billing, I think"}), 400, "invalid_correction"),
        (httpx.post(f"{gw.url}/feedback", content=b"{not json", timeout=5,
                    headers={"Authorization": f"Bearer {KEY}"}), 400, "invalid_json"),
    ]
    for resp, status, code in refusals:
        assert resp.status_code == status, (resp.status_code, resp.text)
        if code:
            assert resp.json()["error"]["code"] == code
    assert "schema" in refusals[8][0].json()["error"]["message"] or "refund" in refusals[8][0].json()["error"]["message"]

    log.flush()
    stored = _lines(feedback.path)
    assert len(stored) == 1  # refused feedback is not stored
    entry = stored[0]
    assert entry["id"] == rid and entry["version"] == 3 and entry["model"] == "triage"
    assert json.loads(entry["correction"]) == {"category": "feature_request"}
    raw = feedback.path.read_text()
    for secret in ("Jane Miller", "EMP-54321", "jane@example.com"):
        assert secret not in raw  # the sanitizer's redactor, custom patterns included
    assert "<EMPLOYEE_ID>" in entry["comment"] and "<EMAIL>" in entry["comment"] and "<NAME>" in entry["comment"]
    requests = _lines(log.path)
    assert {r["id"] for r in requests} == {rid, *streamed_ids}
    assert all("EMP-12345" not in json.dumps(r) and r["messages"][0]["role"] == "user" for r in requests)
    assert KEY not in log.path.read_text()  # only the key's digest is logged


def test_feedback_after_restart_finds_the_id_in_the_log(endpoint, tmp_path):
    """Ids are remembered in memory and, beyond that (a restarted gateway), looked up in the request log."""
    gw, log, _ = endpoint
    client = openai.OpenAI(base_url=gw.url, api_key=KEY, max_retries=0)
    rid = client.chat.completions.create(model="triage", messages=[{"role": "user", "content": "hi"}]).id
    log.flush()
    routes = Routes()
    routes.set(Route("triage", "triage-v3-abc", 3, TASK))
    fresh = RequestLog(tmp_path / "fb2.jsonl", 2**20, 30, text_fields=("correction", "comment"))
    gw2 = GatewayServer(build_app(routes, "http://127.0.0.1:9", "k", {KEY, OTHER}, log, feedback=fresh),
                        "127.0.0.1", _free_port()).start()
    try:
        assert _feedback(gw2, {"id": rid, "thumbs": "up"}).status_code == 200
        assert _feedback(gw2, {"id": rid, "thumbs": "up"}, key=OTHER).status_code == 404
    finally:
        gw2.stop()


def test_feedback_through_the_endpoint_is_curated_as_the_client_meant_it(endpoint, tmp_path):
    """Producer to consumer: feedback of each kind posted through the endpoint, curated from the files the
    gateway wrote. A thumbs-up, a score or a comment alone is no correction (they were stored with
    ``"correction": ""`` and curated as empty answers that counted towards a drift retrain); a later
    thumbs-up keeps an earlier correction; a blank correction is refused."""
    gw, log, feedback = endpoint
    client = openai.OpenAI(base_url=gw.url, api_key=KEY, max_retries=0)
    rids = [client.chat.completions.create(model="triage", messages=[{"role": "user", "content": f"ticket {i}"}]).id
            for i in range(6)]
    fix = json.dumps({"category": "shipping"})
    for body in ({"id": rids[0], "thumbs": "up"}, {"id": rids[1], "score": 3}, {"id": rids[2], "comment": "slow"},
                 {"id": rids[3], "thumbs": "down"}, {"id": rids[4], "correction": fix},
                 {"id": rids[4], "thumbs": "up"}, {"id": rids[5], "score": 5}):
        assert _feedback(gw, body).status_code == 200, body
    blank = _feedback(gw, {"id": rids[0], "correction": "   "})
    assert blank.status_code == 400 and blank.json()["error"]["code"] == "invalid_feedback"
    log.flush()
    stored = _lines(feedback.path)
    assert [sorted(set(e) & {"thumbs", "score", "correction", "comment"}) for e in stored] == [
        ["thumbs"], ["score"], ["comment"], ["thumbs"], ["correction"], ["thumbs"], ["score"]]  # absent stays absent
    out = tmp_path / "curated"
    report = curate(CurateConfig(eval_share=0.0), TASK, build_task(TASK), log.path, feedback.path, out,
                    model="triage", say=lambda _: None)
    assert report["curated"]["by_kind"] == {"correction": 1}
    assert report["skipped"]["by_reason"] == {"negative_without_correction": 1, "neutral_score": 1,
                                              "comment_only": 1, "positive_not_used": 2}
    train = _lines(out / "train.jsonl")
    assert [r["messages"][-1]["content"] for r in train] == [fix]
    assert [p["chosen"] for p in _lines(out / "preference.jsonl")] == [fix]


def test_feedback_is_acknowledged_only_once_on_disk(endpoint):
    """A feedback whose write fails is a 503 the client can retry, never "stored"."""
    gw, _, feedback = endpoint
    client = openai.OpenAI(base_url=gw.url, api_key=KEY, max_retries=0)
    rid = client.chat.completions.create(model="triage", messages=[{"role": "user", "content": "hi"}]).id
    feedback.path.parent.mkdir(parents=True, exist_ok=True)
    feedback.path.parent.chmod(0o500)  # the disk refuses the write (as a full or read-only one does)
    feedback.path.unlink(missing_ok=True)
    try:
        if feedback.path.parent.stat().st_mode & 0o200 or __import__("os").geteuid() == 0:
            feedback.path.mkdir()  # root ignores permissions: a directory where the file goes fails the open
        refused = _feedback(gw, {"id": rid, "thumbs": "up"})
    finally:
        feedback.path.parent.chmod(0o700)
        if feedback.path.is_dir():
            feedback.path.rmdir()
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "feedback_not_stored"
    again = _feedback(gw, {"id": rid, "thumbs": "up"})
    assert again.status_code == 200 and len(_lines(feedback.path)) == 1


def test_one_log_policy_for_every_reader_of_what_the_gateway_wrote(endpoint, tmp_path, clean_demo):
    """The request log as the real writer leaves it after a kill mid-line, then a restart: curate, drift and
    the feedback lookup all skip and count the torn line, and read every whole record (drift failed on it
    until someone edited the file; the lookup ignored any bad line). Damage mid-file is an error naming the
    file and line for all three."""
    from pipeline.config import MonitorConfig
    from pipeline.io import LogError
    from pipeline.monitor.drift import check_drift
    from pipeline.serve.gateway.app import find_issued

    gw, log, _ = endpoint
    client = openai.OpenAI(base_url=gw.url, api_key=KEY, max_retries=0)
    first = [client.chat.completions.create(model="triage", messages=[{"role": "user", "content": f"a {i}"}]).id
             for i in range(3)]
    log.flush()
    text = log.path.read_bytes()
    log.path.write_bytes(text[:-20])  # killed while writing its third record
    restarted = RequestLog(log.path, 2**20, 30)  # the next gateway process appends to the same log
    restarted.write({"ts": datetime.now(timezone.utc).isoformat(), "id": "chatcmpl-after", "model": "triage",
                     "status": 200, "prompt": "b", "response": json.dumps({"category": "billing"}), "key_id": "k"})
    restarted.flush()
    assert len(log.rotated()) == 1  # the torn file was set aside: the torn line stays last in its file
    report = curate(CurateConfig(), TASK, build_task(TASK), log.path, tmp_path / "none.jsonl", tmp_path / "cur",
                    model="triage", say=lambda _: None)
    assert report["requests_seen"] == 3 and len(report["torn_lines"]) == 1
    drift = check_drift(clean_demo / "train/clean.jsonl", log.path, MonitorConfig(out_dir=str(tmp_path / "r"),
                                                                                  min_requests=100), TASK)
    assert drift["requests"] == 3 and drift["torn_lines"] == report["torn_lines"]
    assert find_issued(log.path, first[0])["id"] == first[0] and find_issued(log.path, first[2]) is None
    rotated = log.rotated()[0]
    # Damage mid-file, on a line that names the id looked up (a lookup reads only lines holding its id).
    rotated.write_bytes(b'{"id": "' + first[0].encode() + b'", not json\n' + rotated.read_bytes())
    for read in (lambda: curate(CurateConfig(), TASK, build_task(TASK), log.path, tmp_path / "none.jsonl",
                                tmp_path / "cur2", model="triage", say=lambda _: None),
                 lambda: check_drift(clean_demo / "train/clean.jsonl", log.path,
                                     MonitorConfig(out_dir=str(tmp_path / "r2")), TASK),
                 lambda: find_issued(log.path, first[0])):
        with pytest.raises(LogError, match=rf"{rotated.name}:1: not a JSON record"):
            read()


# ---- curate ----------------------------------------------------------------------------------------------

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def _write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


def _request(i: int, text: str, answer: str = '{"category": "billing"}', status: int = 200, model: str = "triage"):
    return {"ts": (T0 + timedelta(seconds=i)).isoformat(), "id": f"chatcmpl-{i:04d}", "key_id": "k", "model": model,
            "version": 3, "status": status, "prompt": text, "response": answer if status == 200 else "",
            "messages": [{"role": "user", "content": text}]}


def _fb(i: int, rid: int, **kw):
    return {"ts": (T0 + timedelta(seconds=1000 + i)).isoformat(), "id": f"chatcmpl-{rid:04d}", "key_id": "k",
            "model": "triage", "version": 3, **kw}


def test_curate_provenance_split_pairs_and_reconciliation(tmp_path):
    logs, out = tmp_path / "serving", tmp_path / "curated"
    fix = json.dumps({"category": "feature_request"})
    reqs = [_request(i, f"Please add feature number {i} to the app") for i in range(60)]
    reqs += [_request(60, "broken", status=502), _request(61, "other model", model="else")]
    _write(logs / "requests.jsonl", reqs)
    fbs = [_fb(i, i, correction=fix, thumbs="down") for i in range(40)]           # 40 corrections
    fbs += [_fb(40, 40, thumbs="up"), _fb(41, 41, score=5)]                         # positives (not used)
    fbs += [_fb(42, 42, thumbs="down"), _fb(43, 43, score=1)]                       # negatives, no fix
    fbs += [_fb(44, 44, score=3), _fb(45, 45, comment="meh")]                       # neutral, comment
    fbs += [_fb(46, 0, correction=json.dumps({"category": "billing"}))]             # latest correction wins
    fbs += [_fb(47, 9999, thumbs="up")]                                             # request not in log
    fbs += [_fb(48, 60, correction=fix)]                                            # on a failed request
    _write(logs / "feedback.jsonl", fbs)
    task = build_task(TASK)
    cfg = CurateConfig(eval_share=0.25)
    report = curate(cfg, TASK, task, logs / "requests.jsonl", logs / "feedback.jsonl", out, model="triage",
                    say=lambda m: None)

    assert report["reconciles"] and report["requests_seen"] == 61  # the other model's request is not ours
    assert report["curated"]["by_kind"] == {"correction": 40}
    assert report["skipped"]["by_reason"] == {
        "negative_without_correction": 2, "neutral_score": 1, "comment_only": 1, "positive_not_used": 2,
        "no_feedback": 14, "not_answered": 1}
    assert report["feedback"]["orphaned"] == {"request_not_in_log": 1}
    train, evals, pairs = (_lines(out / f"{k}.jsonl") for k in ("train", "eval", "preference"))
    assert len(train) + len(evals) == 40 and 4 <= len(evals) <= 18
    expected_eval = {f"chatcmpl-{i:04d}" for i in range(40) if held_out(f"chatcmpl-{i:04d}", 0.25, 0)}
    assert {r["provenance"]["request_id"] for r in evals} == expected_eval  # deterministic by request id
    for r in train + evals:
        prov = r["provenance"]
        assert prov["feedback"] == "correction" and prov["served_version"] == 3 and prov["model"] == "triage"
        assert prov["request_ts"] and prov["feedback_ts"] and prov["cut"] == 1
        assert r["messages"][-1]["role"] == "assistant"
    first = next(r for r in train + evals if r["provenance"]["request_id"] == "chatcmpl-0000")
    assert json.loads(first["messages"][-1]["content"]) == {"category": "billing"}  # the latest correction
    # A correction that differs from the model's answer is a DPO pair; held-out ones are not trained on.
    assert len(pairs) == len(train) - (0 if "chatcmpl-0000" in expected_eval else 1)
    assert all(p["rejected"] == '{"category": "billing"}' and p["chosen"] == fix for p in pairs)

    # A second run over the same logs adds nothing; new feedback on an old request is picked up.
    again = curate(cfg, TASK, task, logs / "requests.jsonl", logs / "feedback.jsonl", out, model="triage",
                   say=lambda m: None)
    assert again["requests_seen"] == 0 and again["curated"]["total"] == 0 and again["reconciles"]
    _write(logs / "feedback.jsonl", [_fb(60, 50, correction=fix)])
    third = curate(cfg.model_copy(update={"positive_answers": True}), TASK, task, logs / "requests.jsonl",
                   logs / "feedback.jsonl", out, model="triage", say=lambda m: None)
    assert third["requests_seen"] == 1 and third["curated"]["by_kind"] == {"correction": 1}
    assert third["totals"]["train"] + third["totals"]["eval"] == 41 and third["cuts"] == 2


def test_curate_refuses_a_corrupt_log_line_naming_it(tmp_path):
    logs = tmp_path / "serving"
    _write(logs / "requests.jsonl", [_request(0, "hello")])
    with open(logs / "requests.jsonl", "a") as fh:
        fh.write("{torn\n")
        fh.write(json.dumps(_request(1, "x")) + "\n")
    from pipeline.curate import LogError

    with pytest.raises(LogError, match=r"requests.jsonl:2"):
        curate(CurateConfig(), TASK, build_task(TASK), logs / "requests.jsonl", logs / "feedback.jsonl",
               tmp_path / "curated", say=lambda m: None)


def test_curated_records_through_sanitize_catch_eval_contamination(project):
    """The stage pair as DVC runs it: curated corrections -> sanitize; a correction whose prompt is an eval
    item is caught as contamination, a PII-bearing one is redacted, provenance survives."""
    from pipeline.config import load_params
    from pipeline.stages import curate as curate_stage, sanitize as sanitize_stage

    p = load_params("params.yaml")
    eval_item = json.loads(Path(p.data.eval[0]).read_text().splitlines()[0])
    planted = eval_item["messages"][0]["content"]
    reqs = [_request(i, f"Could you add a dark mode option number {i} to the dashboard? Thanks, Anna Schmidt")
            for i in range(12)]
    reqs.append(_request(12, planted))
    _write(Path(p.serve.traffic_log), reqs)
    fb = [_fb(i, i, correction=json.dumps({"category": "technical", "priority": "low"})) for i in range(12)]
    fb.append(_fb(12, 12, correction=eval_item["messages"][1]["content"]))
    _write(Path(p.serve.traffic_log).with_name("feedback.jsonl"), fb)
    p = p.model_copy(update={"project": p.project.model_copy(update={"name": "triage"}),
                             "curate": p.curate.model_copy(update={"eval_share": 0.0})})
    report = curate_stage(p)
    assert report["curated"]["total"] == 13 and report["reconciles"]
    summary = sanitize_stage(p)
    cur = summary["curated"]
    assert cur["read"] == 13 and cur["duplicates"]["contamination"] == 1 and cur["reconciles"]
    assert cur["redactions"]["by_type"].get("NAME", 0) >= 12
    clean = _lines(Path(p.sanitize.out_dir) / "curated" / "clean.jsonl")
    assert len(clean) == 12 and all(r["provenance"]["feedback"] == "correction" for r in clean)
    assert all("Anna Schmidt" not in json.dumps(r) for r in clean)
    assert planted not in json.dumps(clean)


# ---- the teacher when it misbehaves ----------------------------------------------------------------------

def _teacher_app(calls: dict):
    """An OpenAI-compatible teacher over real HTTP: refuses prompts with "refuse" (400), fails the first
    call of prompts with "flaky" (503), answers the rest."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route as Endpoint

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "teach", "root": "/weights/teach-v7"}]})

    async def chat(request):
        body = await request.json()
        text = body["messages"][-1]["content"]
        calls[text] = calls.get(text, 0) + 1
        if "refuse" in text:
            return JSONResponse({"error": {"message": "content policy"}}, status_code=400)
        if "flaky" in text and calls[text] == 1:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        return JSONResponse({"choices": [{"index": 0, "message": {"role": "assistant",
                                                                  "content": '{"category": "billing"}'}}]})

    return Starlette(routes=[Endpoint("/v1/models", models), Endpoint("/v1/chat/completions", chat, methods=["POST"])])


def test_teacher_retries_transient_skips_refusals_and_a_dead_teacher_consumes_nothing(tmp_path):
    from pipeline.config import TeacherConfig
    from pipeline.curate.teacher import Teacher, TeacherUnavailable

    calls: dict = {}
    server = GatewayServer(_teacher_app(calls), "127.0.0.1", _free_port()).start()
    cfg = TeacherConfig(url=f"http://127.0.0.1:{server.port}/v1", model="teach", retries=2, retry_backoff_s=0.05,
                        requests_per_s=100, timeout_s=5, cache_dir=str(tmp_path / "cache"))
    logs, out = tmp_path / "serving", tmp_path / "curated"
    _write(logs / "requests.jsonl", [_request(0, "plain ticket"), _request(1, "please refuse this"),
                                     _request(2, "a flaky one")])
    task = build_task(TASK)

    def run(teacher):
        try:
            return curate(CurateConfig(), TASK, task, logs / "requests.jsonl", logs / "feedback.jsonl", out,
                          teacher=teacher, say=lambda m: None)
        finally:
            teacher.close()

    try:
        teacher = Teacher(cfg, TASK, say=lambda m: None)
        assert teacher.version == "/weights/teach-v7"  # what the endpoint serves, part of the cache key
        report = run(teacher)
    finally:
        server.stop()
    assert report["curated"]["by_kind"] == {"teacher": 2} and report["skipped"]["by_reason"] == {"teacher_refused": 1}
    assert report["teacher"]["retries"] == 1 and calls["a flaky one"] == 2 and report["reconciles"]
    records = _lines(out / "train.jsonl")
    assert all(r["provenance"]["teacher"] == {"model": "teach", "version": "/weights/teach-v7", "url": cfg.url}
               for r in records)

    # The teacher goes away: new requests are not consumed, nothing is written, and the next run (teacher
    # back) takes exactly them.
    _write(logs / "requests.jsonl", [_request(10, "ticket after the outage"), _request(11, "another one")])
    cursor = (logs / "curate_cursor.json").read_text()
    before = (out / "train.jsonl").read_text()
    server = GatewayServer(_teacher_app(calls), "127.0.0.1", server.port).start()
    teacher = Teacher(cfg, TASK, say=lambda m: None)
    server.stop()
    with pytest.raises(TeacherUnavailable, match="no answer after 3 attempts"):
        run(teacher)
    assert (logs / "curate_cursor.json").read_text() == cursor and (out / "train.jsonl").read_text() == before
    server = GatewayServer(_teacher_app(calls), "127.0.0.1", server.port).start()
    try:
        again = run(Teacher(cfg, TASK, say=lambda m: None))
    finally:
        server.stop()
    assert again["requests_seen"] == 2 and again["curated"]["by_kind"] == {"teacher": 2} and again["reconciles"]
