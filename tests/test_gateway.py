"""The serving gateway: keys, refusals that never reach vLLM, redacted rotated log, registry-driven swaps."""

import json
import os
import socket
import time
from pathlib import Path

import httpx
import pytest

from pipeline.config import RegistryConfig, ServeConfig, TaskConfig
from pipeline.serve.gateway import GatewayServer, RequestLog, Route, Routes, build_app, load_keys
from tests.conftest import ROOT

KEY = "test-key-123"
VLLM_PYTHON = ROOT / ".venv-vllm/bin/python"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_keys_come_from_env_or_file_and_none_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("LORAFLOW_API_KEYS", raising=False)
    with pytest.raises(ValueError, match="never runs unauthenticated"):
        load_keys("")
    monkeypatch.setenv("LORAFLOW_API_KEYS", "a, b,,")
    assert load_keys("") == {"a", "b"}
    f = tmp_path / "keys"
    f.write_text("# clients\nc\n\n")
    assert load_keys(str(f)) == {"a", "b", "c"}
    with pytest.raises(ValueError, match="does not exist"):
        load_keys(str(tmp_path / "missing"))


def test_request_log_redacts_before_writing_and_rotates(tmp_path):
    log = RequestLog(tmp_path / "req.jsonl", max_bytes=250, retention_days=30)
    for i in range(6):
        log.write({"model": "m", "prompt": f"mail me at jane.doe{i}@example.com or call +1 415 555 0134",
                   "response": "card 4111 1111 1111 1111 noted"})
    log.flush()
    files = [log.path, *log.rotated()]
    text = "".join(f.read_text() for f in files)
    assert len(log.rotated()) >= 2 and len(text.splitlines()) == 6
    assert "@example.com" not in text and "555 0134" not in text and "4111" not in text
    assert "<EMAIL>" in text


@pytest.fixture
def refusing_gateway(tmp_path):
    """A gateway whose upstream does not exist: a request that reached it would answer 503."""
    routes = Routes()
    routes.set(Route("model-a", "model-a-v1-abc", 1, TaskConfig(kind="text")))
    log = RequestLog(tmp_path / "req.jsonl", 2**20, 30)
    app = build_app(routes, f"http://127.0.0.1:{_free_port()}", "upstream-key", {KEY}, log)
    gw = GatewayServer(app, "127.0.0.1", _free_port()).start()
    yield gw, log
    gw.stop()


def test_refusals_never_reach_the_model_server(refusing_gateway):
    gw, log = refusing_gateway
    chat = f"{gw.url}/chat/completions"
    ok_body = {"model": "model-a", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(chat, json=ok_body).status_code == 401
    assert httpx.post(chat, json=ok_body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(chat, json={**ok_body, "model": "nope"}, headers=auth)
    assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
    r = httpx.post(chat, content=b"{not json", headers=auth)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(chat, json={"model": "model-a", "messages": "hi"}, headers=auth)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(chat, json={**ok_body, "max_tokens": -3}, headers=auth)
    assert r.status_code == 400
    assert httpx.get(f"{gw.url}/models").status_code == 401
    assert [m["id"] for m in httpx.get(f"{gw.url}/models", headers=auth).json()["data"]] == ["model-a"]
    log.flush()
    # Nothing was forwarded; the authenticated refusals are accounted for in the log with their reason
    # (unauthenticated ones are not: no key, no client to account to).
    refusals = [json.loads(x) for x in log.path.read_text().splitlines()]
    assert [(r["status"], r["error"]) for r in refusals] == [(404, "model_not_found"), (400, "invalid_json"),
                                                              (400, "invalid_request"), (400, "invalid_request")]
    assert not any("version" in r for r in refusals)
    # A well-formed, authorised request does go upstream (absent here: 503, logged).
    assert httpx.post(chat, json=ok_body, headers=auth).status_code == 503
    log.flush()
    last = json.loads(log.path.read_text().splitlines()[-1])
    assert last["status"] == 503 and last["version"] == 1


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="vLLM environment missing: run `make vllm-env`")
def test_registry_driven_swaps_behind_one_endpoint(tiny_base, clean_demo, tmp_path, monkeypatch):
    """Real vLLM (CPU) and a real MLflow registry: the openai client on stable names, swaps, a broken
    version, two models side by side, redacted log."""
    import openai

    from pipeline.config import TrainConfig
    from pipeline.hashing import dir_sha256
    from pipeline import registry
    from pipeline.serve.follow import Follower
    from pipeline.serve.vllm import VLLMServer
    from pipeline.train.trainer import train

    monkeypatch.chdir(tmp_path)
    reg = RegistryConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "art"))
    task = TaskConfig(kind="text", max_new_tokens=8)

    def adapter(tag: str, seed: int, rank: int = 8) -> Path:
        out = tmp_path / f"adapter-{tag}"
        train(TrainConfig(out_dir=str(out), checkpoint_dir=str(tmp_path / "ck"), lora_r=rank, lora_alpha=2 * rank, trl=dict(max_steps=6, per_device_train_batch_size=8, learning_rate=5e-2, seed=seed, max_length=96), max_truncated_share=1.0),
              tiny_base, clean_demo / "train/clean.jsonl")
        return out

    def register(model: str, path: Path) -> int:
        run = registry.log_candidate(reg, run_name=path.name, params={}, adapter_dir=path, train_metrics={},
                                     eval_metrics={}, artifacts={}, tags={})
        return registry.register(reg, model, run, {"adapter_sha256": dir_sha256(path)}, "card").version

    a1, a2, wide = adapter("one", 0), adapter("two", 1), adapter("wide", 2, rank=32)  # 32 > max_lora_rank
    assert register("alpha", a1) == 1 and register("alpha", a2) == 2 and register("alpha", wide) == 3
    assert register("beta", a2) == 1
    registry.promote(reg, "alpha", 1)
    registry.promote(reg, "beta", 1)

    cfg = ServeConfig(python=str(VLLM_PYTHON), port=_free_port(), max_lora_rank=16, max_loras=4,
                      log_file=str(tmp_path / "vllm.log"))
    from pipeline.modeling import publish_base

    # As `loraflow serve` does: vLLM runs from the base store (immutable, named by the weights' digest).
    server = VLLMServer.start(cfg, publish_base(tiny_base, tmp_path / "bases", beside=False), api_key="vllm-secret")
    said: list[str] = []
    try:
        server.wait_ready()
        assert httpx.get(f"{server.url}/v1/models").status_code == 401  # vLLM itself wants its key
        routes = Routes()
        prompts = [[{"role": "user", "content": "The package arrived damaged."}]]
        changes: list[dict] = []
        follower = Follower(server, routes, reg, tmp_path / "served", ["alpha", "beta"], task, prompts,
                            say=said.append, events_log=tmp_path / "serving.jsonl", on_change=changes.append)
        follower.reconcile()
        log = RequestLog(tmp_path / "req.jsonl", 2**20, 30)
        gw = GatewayServer(build_app(routes, server.url, "vllm-secret", {KEY}, log), "127.0.0.1", _free_port()).start()
        client = openai.OpenAI(base_url=gw.url, api_key=KEY, max_retries=0)
        assert sorted(m.id for m in client.models.list().data) == ["alpha", "beta"]
        question = [{"role": "user", "content": "My card was declined, call me at +1 415 555 0134 or mail "
                                                "jane.doe@example.com"}]
        first = client.chat.completions.create(model="alpha", messages=question, temperature=0)
        assert first.model == "alpha" and first.choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="alpha", messages=question, temperature=0, stream=True) if c.choices)
        assert streamed == first.choices[0].message.content
        beta = client.chat.completions.create(model="beta", messages=question, temperature=0)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=gw.url, api_key="bad", max_retries=0).models.list()
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="alpha-v1", messages=question)

        # The alias moves (as in the MLflow UI): the stable name answers from v2 without a vLLM restart.
        old_internal = routes.get("alpha").internal
        registry.promote(reg, "alpha", 2)
        follower.reconcile()
        assert routes.get("alpha").version == 2 and routes.get("alpha").internal != old_internal
        second = client.chat.completions.create(model="alpha", messages=question, temperature=0)
        assert second.choices[0].message.content == beta.choices[0].message.content  # v2's weights = beta's
        deadline = time.time() + 30
        while old_internal in server.models() and time.time() < deadline:
            time.sleep(0.5)
        assert old_internal not in server.models()

        # A version vLLM cannot load: v2 keeps answering, the alias goes back, the version says why.
        registry.promote(reg, "alpha", 3)
        follower.reconcile()
        assert routes.get("alpha").version == 2 and registry.get_alias(reg, "alpha").version == 2
        status = registry.client(reg).get_model_version("alpha", "3").tags["serving_status"]
        assert status.startswith("rejected: load failed")
        assert client.chat.completions.create(model="alpha", messages=question, temperature=0).choices[0].message.content

        log.flush()
        text = log.path.read_text()
        records = [json.loads(x) for x in text.splitlines()]
        answered = [r for r in records if r["status"] == 200]
        assert len(answered) == 5 and {r["model"] for r in answered} == {"alpha", "beta"}
        assert [(r["status"], r["model"]) for r in records if r["status"] != 200] == [(404, "alpha-v1")]
        assert "555 0134" not in text and "jane.doe@example.com" not in text
        assert all(r["latency_s"] > 0 for r in answered)

        # Storage fails during a swap: not the version's fault. Nothing is tagged, the alias stays, v2 keeps
        # serving, and the swap is retried: served once the storage is back.
        assert register("alpha", a1) == 4
        run_id = registry.client(reg).get_model_version("alpha", "4").run_id
        stored = Path(registry.client(reg).get_run(run_id).info.artifact_uri.removeprefix("file://")) / "adapter"
        assert (stored / "adapter_config.json").is_file()
        hidden = stored.with_name(stored.name + ".unavailable")
        stored.rename(hidden)
        registry.promote(reg, "alpha", 4)
        [deferred] = follower.reconcile()
        assert deferred.get("deferred", "").startswith("download failed") and routes.get("alpha").version == 2, deferred
        assert registry.get_alias(reg, "alpha").version == 4
        assert "serving_status" not in registry.client(reg).get_model_version("alpha", "4").tags
        assert follower.reconcile() == []  # within the backoff wait: no hammering
        hidden.rename(stored)
        follower.deferred["alpha"] = (4, 1, 0.0)  # the wait is over
        follower.reconcile()
        assert routes.get("alpha").version == 4

        # The smoke test itself errors (vLLM refuses its prompt): what was loaded for it is unloaded again.
        assert register("alpha", a2) == 5
        registry.set_version_tag(reg, "alpha", 5, "smoke_prompts", json.dumps([[{"role": "user", "content": 123}]]))
        deadline = time.time() + 30  # v2 retires in the background after the swap to v4: let it finish first
        while any(m.startswith("alpha-v2-") for m in server.models()) and time.time() < deadline:
            time.sleep(0.5)
        loaded = set(server.models())
        registry.promote(reg, "alpha", 5)
        [result] = follower.reconcile()
        assert result.get("rejected", "").startswith("smoke test could not run"), result
        assert routes.get("alpha").version == 4
        assert set(server.models()) == loaded and registry.get_alias(reg, "alpha").version == 4
        gw.stop()
        # The serving log (the dossier's serving periods) holds every swap and rejection, in order, as
        # on_change heard them.
        logged = [json.loads(x) for x in (tmp_path / "serving.jsonl").read_text().splitlines()]
        assert logged == changes
        assert [(e["event"], e["model"], e["version"]) for e in logged] == [
            ("served", "alpha", 1), ("served", "beta", 1), ("served", "alpha", 2), ("rejected", "alpha", 3),
            ("served", "alpha", 4), ("rejected", "alpha", 5)]
        assert logged[2]["previous"] == 1 and logged[3]["reason"].startswith("load failed")

        _bases_are_checked_before_any_load(server, reg, register, a1, task, prompts, tiny_base, tmp_path, said)

        _teacher_labels_through_curate_with_a_cache(server, tmp_path, monkeypatch, said)
    finally:
        server.stop()
    assert not any("Traceback" in s for s in said)
    assert os.path.exists(cfg.log_file)


def _bases_are_checked_before_any_load(server, reg, register, adapter, task, prompts, tiny_base, tmp_path, said):
    """Base -> serve, against this real vLLM: attached, it serves the base store folder it was started from
    (its model root, named by the weights' digest); a version trained on another base is deferred and reported, never
    loaded (serving used not to check an attached vLLM at all), and loaded once the bases agree. Started by
    us, a base change to a base not on this machine is "not now" (deferred, engine untouched), never a
    rejection (it was, for good)."""
    from pipeline import registry
    from pipeline.config import Params
    from pipeline.modeling import publish_base
    from pipeline.serve.endpoint import Endpoint
    from pipeline.serve.follow import Follower
    from pipeline.serve.vllm import VLLMPool

    store = tmp_path / "bases"
    own = publish_base(tiny_base, store, beside=False).name  # where this vLLM was started from
    pool = VLLMPool([server])
    assert pool.base_identity() == own
    assert register("gamma", adapter) == 1
    registry.set_version_tag(reg, "gamma", 1, "base_weights_sha256", "f" * 64)
    registry.promote(reg, "gamma", 1)
    routes = Routes()
    attached = Follower(pool, routes, reg, tmp_path / "served-gamma", ["gamma"], task, prompts, say=said.append,
                        attached_base=pool.base_identity)
    loaded = set(server.models())
    [deferred] = attached.reconcile()
    assert "not loaded" in deferred["deferred"] and "ffffffffffff" in deferred["deferred"], deferred
    assert set(server.models()) == loaded and routes.get("gamma") is None
    assert registry.get_alias(reg, "gamma").version == 1
    assert "serving_status" not in registry.client(reg).get_model_version("gamma", "1").tags
    registry.set_version_tag(reg, "gamma", 1, "base_weights_sha256", own)
    attached.deferred.clear()
    [served] = attached.reconcile()
    assert served["version"] == 1 and routes.get("gamma").version == 1, served

    p = Params(project={"name": "gamma"}, base={"out_dir": str(tiny_base), "store_dir": str(store)}, registry=reg)
    endpoint = Endpoint(p, pool, {"k"}, say=said.append)
    registry.set_version_tag(reg, "gamma", 1, "base_weights_sha256", "e" * 64)
    started = Follower(pool, Routes(), reg, tmp_path / "served-gamma2", ["gamma"], task, prompts, say=said.append,
                       base_sha=own, rebase=endpoint._rebase)
    [deferred] = started.reconcile()
    assert deferred["deferred"].startswith("base change not done") and "not on this machine" in deferred["deferred"]
    assert server.healthy()  # the engine was not stopped for a base it could not have
    assert registry.client(reg).get_model_version("gamma", "1").tags["serving_status"] == "served"  # not rejected
    assert registry.get_alias(reg, "gamma").version == 1


def _teacher_labels_through_curate_with_a_cache(server, tmp_path, monkeypatch, said) -> None:
    """This vLLM (its base model, served as "base") is the teacher of unlabelled requests: labels go through
    the task's parser into curated records with the teacher in their provenance; a re-run over the same
    prompts is all cache hits; the per-run cap leaves the rest for the next run."""
    from datetime import datetime, timedelta, timezone

    from pipeline.config import CurateConfig, TeacherConfig
    from pipeline.curate import curate
    from pipeline.curate.teacher import Teacher
    from pipeline.tasks import build_task

    monkeypatch.setenv("TEST_TEACHER_KEY", "vllm-secret")
    text = TaskConfig(kind="text", max_new_tokens=8)
    cfg = TeacherConfig(url=f"{server.url}/v1", model="base", api_key_env="TEST_TEACHER_KEY", batch_size=3,
                        concurrency=2, requests_per_s=20, cache_dir=str(tmp_path / "teacher-cache"))
    t0 = datetime.now(timezone.utc)

    def logged(folder: str, n: int, offset: int = 0) -> Path:
        path = tmp_path / folder / "requests.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({
            "ts": (t0 + timedelta(seconds=i)).isoformat(), "id": f"chatcmpl-{folder}-{i}", "model": "m",
            "version": 1, "status": 200, "response": "", "prompt": f"ticket {i + offset}",
            "messages": [{"role": "user", "content": f"Where is my parcel number {i + offset}?"}]}) + "\n"
            for i in range(n)))
        return path

    def run(folder: str, n: int, offset: int = 0, **kw) -> dict:
        teacher = Teacher(cfg.model_copy(update=kw), text, say=said.append)
        try:
            return curate(CurateConfig(eval_share=0.5), text, build_task(text), logged(folder, n, offset),
                          tmp_path / folder / "feedback.jsonl", tmp_path / folder / "curated", teacher=teacher,
                          say=said.append)
        finally:
            teacher.close()

    first = run("one", 6)
    assert first["reconciles"] and first["requests_seen"] == 6
    labelled = first["curated"]["by_kind"].get("teacher", 0)
    # Answers sanitize would quarantine (a random-weight teacher writes control characters) are not curated.
    unusable = sum(v for k, v in first["skipped"]["by_reason"].items()
                   if k == "teacher_answer_invalid" or k.startswith("untrainable_"))
    assert labelled + unusable == 6 and labelled >= 1, first
    assert first["teacher"]["calls"] == 6 + 1 and first["teacher"]["cache_hits"] == 0  # + GET /v1/models
    assert first["teacher"]["version"]  # the weights vLLM reports for "base"
    records = [json.loads(x) for x in (tmp_path / "one/curated/train.jsonl").read_text().splitlines()]
    assert len(records) == labelled and (tmp_path / "one/curated/eval.jsonl").read_text() == ""  # never judges
    assert all(r["provenance"]["teacher"]["model"] == "base" and r["provenance"]["feedback"] == "teacher"
               for r in records)
    again = run("two", 6)  # other requests, the same prompts: nothing is asked twice
    assert again["teacher"]["cache_hits"] == 6 and again["teacher"]["calls"] == 1
    assert again["curated"]["by_kind"] == first["curated"]["by_kind"]
    capped = run("three", 5, offset=100, max_per_run=2, batch_size=2)  # new prompts: 2 asked, 3 left
    assert capped["deferred"] == 3 and capped["reconciles"] and capped["teacher"]["calls"] == 3, capped
    nxt = run("three", 5, offset=100, max_per_run=10)
    assert nxt["requests_seen"] == 3 and nxt["teacher"]["cache_hits"] == 0 and nxt["reconciles"], nxt


def _sign(secret: str, delivery: str, stamp: str, body: bytes) -> str:
    import base64
    import hashlib
    import hmac

    return "v1," + base64.b64encode(hmac.new(secret.encode(), f"{delivery}.{stamp}.".encode() + body,
                                             hashlib.sha256).digest()).decode()


@pytest.mark.timeout(300)
def test_mlflow_webhooks_reach_the_gateway_and_forgeries_do_not(tmp_path, mlflow_server):
    """A real MLflow tracking server delivers alias moves to the gateway; unsigned, forged, stale and
    replayed deliveries are refused."""
    from mlflow import MlflowClient

    from pipeline import registry

    uri, art = mlflow_server
    events: list[tuple[str, str, int]] = []
    secret = "hook-secret"
    gw = GatewayServer(build_app(Routes(), "http://127.0.0.1:9", "k", {KEY}, RequestLog(tmp_path / "r.jsonl", 2**20, 1),
                                 webhook_secret=secret, on_alias=lambda *e: events.append(e)),
                       "127.0.0.1", _free_port()).start()
    try:
        reg = RegistryConfig(tracking_uri=uri, artifact_root=str(art))
        hook_url = f"http://{gw.host}:{gw.port}/hooks/mlflow"
        first = registry.ensure_webhook(reg, "loraflow-test", hook_url, secret)
        assert registry.ensure_webhook(reg, "loraflow-test", hook_url, secret) == first  # idempotent
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text("{}")
        run = registry.log_candidate(reg, run_name="a", params={}, adapter_dir=adapter, train_metrics={},
                                     eval_metrics={}, artifacts={}, tags={})
        assert registry.register(reg, "alpha", run, {}, "card").version == 1
        MlflowClient(tracking_uri=uri).set_registered_model_alias("alpha", "champion", "1")  # as the UI does
        deadline = time.time() + 30
        while not events and time.time() < deadline:
            time.sleep(0.2)
        assert events == [("alpha", "champion", 1)]

        body = json.dumps({"entity": "model_version_alias", "action": "created",
                           "data": {"name": "alpha", "alias": "champion", "version": "9"}}).encode()
        now = str(int(time.time()))
        hdr = {"X-MLflow-Delivery-Id": "d1", "X-MLflow-Timestamp": now}
        assert httpx.post(hook_url, content=body).status_code == 401  # unsigned
        forged = {**hdr, "X-MLflow-Signature": _sign("not-the-secret", "d1", now, body)}
        assert httpx.post(hook_url, content=body, headers=forged).status_code == 401
        old = str(int(time.time()) - 3600)
        stale = {"X-MLflow-Delivery-Id": "d2", "X-MLflow-Timestamp": old,
                 "X-MLflow-Signature": _sign(secret, "d2", old, body)}
        assert httpx.post(hook_url, content=body, headers=stale).status_code == 400
        good = {**hdr, "X-MLflow-Signature": _sign(secret, "d1", now, body)}
        assert httpx.post(hook_url, content=body, headers=good).status_code == 200
        assert httpx.post(hook_url, content=body, headers=good).status_code == 401  # replayed
        assert events == [("alpha", "champion", 1), ("alpha", "champion", 9)]
    finally:
        gw.stop()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="vLLM environment missing: run `make vllm-env`")
def test_loraflow_serve_prints_its_endpoint_and_sigterm_stops_vllm(tiny_base, clean_demo, tmp_path):
    import signal
    import subprocess
    import sys

    import openai
    import yaml

    from pipeline.config import TrainConfig
    from pipeline.hashing import dir_sha256
    from pipeline import registry
    from pipeline.train.trainer import train

    reg = RegistryConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "art"))
    adapter = tmp_path / "adapter"
    train(TrainConfig(out_dir=str(adapter), checkpoint_dir=str(tmp_path / "ck"), lora_r=8, lora_alpha=16, trl=dict(max_steps=4, per_device_train_batch_size=8, max_length=96), max_truncated_share=1.0), tiny_base, clean_demo / "train/clean.jsonl")
    run = registry.log_candidate(reg, run_name="a", params={}, adapter_dir=adapter, train_metrics={},
                                 eval_metrics={}, artifacts={}, tags={})
    registry.register(reg, "cli-model", run, {"adapter_sha256": dir_sha256(adapter)}, "card")
    registry.promote(reg, "cli-model", 1)
    vllm_port, gw_port = _free_port(), _free_port()
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "project": {"name": "cli-model"}, "task": {"name": "t", "kind": "text", "max_new_tokens": 8},
        "base": {"out_dir": str(tiny_base)},
        "registry": {"tracking_uri": reg.tracking_uri, "artifact_root": reg.artifact_root},
        "serve": {"python": str(VLLM_PYTHON), "port": vllm_port, "gateway_port": gw_port, "poll_interval_s": 2,
                  "log_file": str(tmp_path / "vllm.log"), "traffic_log": str(tmp_path / "requests.jsonl"),
                  "adapters_dir": str(tmp_path / "served")}}))
    env = {**os.environ, "LORAFLOW_API_KEYS": KEY}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("loraflow")), "serve", "--params", str(params)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("endpoint: "):
                break
        assert lines and lines[-1].strip() == f"endpoint: http://127.0.0.1:{gw_port}/v1", "".join(lines)
        client = openai.OpenAI(base_url=lines[-1].split(" ", 1)[1].strip(), api_key=KEY, max_retries=0)
        answer = client.chat.completions.create(model="cli-model", messages=[{"role": "user", "content": "hi"}])
        assert answer.model == "cli-model" and answer.choices[0].message.content
        import threading

        import psutil

        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        # vLLM dies under `loraflow serve`: 503 with Retry-After at once, then it is restarted and the champion
        # loaded again without a person.
        [engine] = [c for c in psutil.Process(proc.pid).children(recursive=True)
                    if "vllm.entrypoints" in " ".join(c.cmdline())]
        engine.kill()
        engine.wait(30)
        chat = {"model": "cli-model", "messages": [{"role": "user", "content": "hi"}]}
        url = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
        dark = httpx.post(url, json=chat, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert dark.status_code == 503 and int(dark.headers["Retry-After"]) >= 1
        deadline = time.time() + 600
        while time.time() < deadline:
            r = httpx.post(url, json=chat, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
            if r.status_code == 200:
                break
            assert r.status_code == 503, r.text
            time.sleep(2)
        assert r.status_code == 200 and r.json()["model"] == "cli-model", "".join(lines)
        health = httpx.get(f"http://127.0.0.1:{gw_port}/health", timeout=5).json()
        assert health["engine"]["restarts"] == 1 and health["engine"]["up"]
        assert any("vLLM exited with code" in line for line in lines) and any("vLLM restarted" in line for line in lines)
        assert KEY not in "".join(lines)  # keys are never printed
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    with socket.socket() as s:  # vLLM went with it (the restarted one too): nothing listens on its port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # closed connections in TIME_WAIT are not a listener
        s.bind(("127.0.0.1", vllm_port))
    import psutil

    assert not [p for p in psutil.process_iter(["cmdline"]) if f"--port {vllm_port}" in " ".join(p.info["cmdline"] or [])
                or f"--port={vllm_port}" in " ".join(p.info["cmdline"] or [])]
    assert json.loads((tmp_path / "requests.jsonl").read_text().splitlines()[0])["model"] == "cli-model"


def test_requests_spread_over_a_replicas_small_pools_fewest_in_flight_first():
    """Each replica's connections are POOL_SHARDS small pools; a request takes the emptiest, so none
    queues in a full pool while another has room."""
    from pipeline.serve.gateway.upstreams import POOL_CONNECTIONS, POOL_SHARDS, Upstreams

    up = Upstreams(["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"], "k", 5.0)
    pools = [up.take(1) for _ in range(POOL_SHARDS * POOL_CONNECTIONS)]
    assert all(POOL_SHARDS <= p < 2 * POOL_SHARDS for p in pools)  # replica 1's pools only
    assert {pools.count(p) for p in set(pools)} == {POOL_CONNECTIONS}  # every pool filled evenly
    assert up.in_flight == [0, POOL_SHARDS * POOL_CONNECTIONS]
    freed = pools[5]
    up.done(freed)
    assert up.take(1) == freed and up.in_flight[1] == POOL_SHARDS * POOL_CONNECTIONS  # the pool with room
    for p in pools[:5] + pools[6:]:
        up.done(p)
    assert up.in_flight == [0, 1] and sum(up.pool_in_flight) == 1
    assert str(up.client(freed).base_url).startswith("http://127.0.0.1:2")
