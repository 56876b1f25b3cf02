"""The MLflow adapter against a real SQLite-backed tracking store and registry."""

from pathlib import Path

import pytest

from pipeline import registry
from pipeline.config import RegistryConfig
from pipeline.hashing import dir_sha256


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return RegistryConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow/mlflow.db",
                          artifact_root=str(tmp_path / "mlflow/artifacts"))


def _adapter(tmp_path: Path, tag: str) -> Path:
    d = tmp_path / f"adapter-{tag}"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"r": 4, "tag": "%s"}' % tag)
    (d / "adapter_model.safetensors").write_bytes(tag.encode() * 100)
    return d


def _register(cfg, tmp_path, tag):
    adapter = _adapter(tmp_path, tag)
    run_id = registry.log_candidate(
        cfg, run_name=tag, params={"train": {"lora_r": 4}}, adapter_dir=adapter,
        train_metrics={"loss_curve": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}], "duration_s": 3.0},
        eval_metrics={"candidate": {"exact_match": 0.9}}, artifacts={}, tags={"t": tag})
    return registry.register(cfg, "m", run_id, {"adapter_sha256": dir_sha256(adapter)}, f"card {tag}"), adapter


def test_register_promote_rollback_and_download(cfg, tmp_path):
    v1, a1 = _register(cfg, tmp_path, "one")
    v2, _ = _register(cfg, tmp_path, "two")
    assert (v1.version, v2.version) == (1, 2)
    assert registry.get_alias(cfg, "m") is None
    with pytest.raises(LookupError, match="no @champion to roll back from"):
        registry.rollback(cfg, "m")
    registry.promote(cfg, "m", 1)
    registry.promote(cfg, "m", 2)
    assert registry.get_alias(cfg, "m").version == 2
    assert registry.rollback(cfg, "m").version == 1
    assert registry.get_alias(cfg, "m").version == 1

    got = registry.download_adapter(cfg, registry.get_alias(cfg, "m"), tmp_path / "served")
    assert got.name == "m-v1" and dir_sha256(got) == dir_sha256(a1)
    assert registry.find_version_by_adapter(cfg, "m", dir_sha256(a1)).version == 1
    assert registry.find_version_by_adapter(cfg, "m", "0" * 64) is None

    metrics = registry.client(cfg).get_run(v1.run_id).data.metrics
    assert metrics["train_loss"] == 1.0 and metrics["candidate_exact_match"] == 0.9


def test_promoting_a_missing_version_fails(cfg, tmp_path):
    from mlflow.exceptions import MlflowException

    v1, _ = _register(cfg, tmp_path, "one")
    registry.promote(cfg, "m", v1.version)
    with pytest.raises(MlflowException) as err:
        registry.promote(cfg, "m", 7)
    assert err.value.error_code == "RESOURCE_DOES_NOT_EXIST" and "7" in str(err.value)
    assert registry.get_alias(cfg, "m").version == v1.version  # a failed promotion leaves the alias alone


def test_the_champion_is_re_scored_on_its_own_base_after_the_base_was_rebuilt(cfg, tmp_path):
    """New training data rebuilds the embedded base before the gate decides. The champion's base stays in
    the store (published by the base stage), so the champion is re-scored on it and the candidate is judged
    against the champion, not against the base model; a champion whose base is gone, or that names none,
    is judged against the base model, and the decision says why."""
    from pipeline.release import promotion as release  # noqa: I001
    from pipeline.config import BaseModelConfig, Params
    from pipeline.modeling import base_weights_sha256, publish_base
    from pipeline.release.gate import ModelScore

    base_dir, store = tmp_path / "base", tmp_path / "bases"
    base_dir.mkdir()
    (base_dir / "config.json").write_text('{"hidden_size": 64}')
    (base_dir / "model.safetensors").write_bytes(b"yesterday's weights")
    old = publish_base(base_dir, store)
    v1, _ = _register(cfg, tmp_path, "old-base")
    registry.set_version_tag(cfg, "m", v1.version, "base_weights_sha256", old.name)
    registry.promote(cfg, "m", v1.version)
    (base_dir / "model.safetensors").write_bytes(b"today's weights")  # the base stage rebuilt it in place
    publish_base(base_dir, store)
    assert base_weights_sha256(base_dir) != old.name and base_weights_sha256(old) == old.name
    p = Params(project={"name": "m"}, registry=cfg, base=BaseModelConfig(out_dir=str(base_dir), store_dir=str(store)),
               serve={"adapters_dir": str(tmp_path / "served")})
    fast = {"tokens_per_s": 100.0}
    guard = {m: 0.5 for m in p.guardrail_metrics if m != "valid"}  # measured for every model, as the evaluate stage does
    candidate = ModelScore("candidate", {"exact_match": 0.9, "valid": 1.0, **guard},
                           {"exact_match": [1] * 36 + [0] * 4}, speed=fast)
    base = ModelScore("base", {"exact_match": 0.0, "valid": 0.0, **guard}, {"exact_match": [0] * 40}, speed=fast)
    rescored = []

    def rescore(adapter, on_base):
        rescored.append(on_base)
        return {"summary": {"exact_match": 0.9, "valid": 1.0, **guard}, "per_example": {"exact_match": [1] * 36 + [0] * 4},
                "speed": fast}

    decision, champion = release.gate(p, candidate, base, rescore)
    assert rescored == [old] and champion.version == 1
    assert decision.reference == "champion v1" and not decision.promote  # a tie with the champion

    # The champion's base is gone from the store (and base_dir holds another): judged against the base.
    import shutil

    for f in old.rglob("*"):
        f.chmod(0o644)
    shutil.rmtree(old)
    decision, _ = release.gate(p, candidate, base, rescore)
    assert decision.promote and decision.reference == "base" and len(rescored) == 1
    assert any(f"base {old.name[:12]} is not on this machine" in r for r in decision.reasons)

def _locked(db: Path):
    """Another writer holding the SQLite store (what a second process mid-write looks like)."""
    import sqlite3

    conn = sqlite3.connect(db, timeout=0.1, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    return conn


def test_a_locked_store_is_could_not_read_never_no_champion_and_nothing_moves(cfg, tmp_path):
    v1, _ = _register(cfg, tmp_path, "one")
    v2, _ = _register(cfg, tmp_path, "two")
    registry.promote(cfg, "m", v1.version)
    # MLflow waits 20 s on a locked SQLite file (its busy_timeout) before each attempt fails: one attempt.
    quick = cfg.model_copy(update={"retries": 0})
    lock = _locked(tmp_path / "mlflow/mlflow.db")
    try:
        with pytest.raises(registry.RegistryUnavailable, match="could not read m@champion after 1 attempts"):
            registry.get_alias(quick, "m")
        with pytest.raises(registry.RegistryUnavailable):
            registry.promote(quick, "m", v2.version, expected=None)  # "no champion" is never assumed
    finally:
        lock.close()
    assert registry.get_alias(cfg, "m").version == v1.version
    assert registry.client(cfg).get_registered_model("m").tags.get("previous_champion") is None


def test_an_unreachable_server_fails_loudly_and_a_missing_alias_is_an_answer(cfg, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    down = RegistryConfig(tracking_uri=f"http://127.0.0.1:{port}", retries=1, retry_backoff_s=0.05, timeout_s=2)
    with pytest.raises(registry.RegistryUnavailable, match=f"127.0.0.1:{port}"):
        registry.get_alias(down, "m")
    _register(cfg, tmp_path, "one")
    assert registry.get_alias(cfg, "m") is None  # the model exists, the alias does not: a definite answer
    assert registry.get_alias(cfg, "no-such-model") is None


def test_transient_failures_are_retried_with_backoff_and_definite_ones_are_not():
    waits, calls = [], []

    class Locked(Exception):
        pass

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise Locked("database is locked")
        return "ok"

    cfg = RegistryConfig(retries=4, retry_backoff_s=0.5)
    assert registry.call(cfg, "read", flaky, sleep=waits.append) == "ok" and waits == [0.5, 1.0]

    class NotFound(Exception):
        error_code = "RESOURCE_DOES_NOT_EXIST"

    def missing():
        calls.append(1)
        raise NotFound("no such model")

    calls.clear()
    with pytest.raises(NotFound):
        registry.call(cfg, "read", missing, sleep=waits.append)
    assert len(calls) == 1


def test_rollback_follows_the_alias_history_including_moves_made_in_the_ui(cfg, tmp_path):
    versions = [_register(cfg, tmp_path, tag)[0].version for tag in ("one", "two", "three", "four")]
    registry.promote(cfg, "m", 1)
    registry.promote(cfg, "m", 2)
    # A person moves the alias in the MLflow UI (the client call the UI makes): loraflow did not see it.
    registry.client(cfg).set_registered_model_alias("m", "champion", "3")
    info = registry.rollback(cfg, "m")
    assert info.version == 2  # the version before the UI move, not a stale previous_champion
    moves = registry.history(cfg, "m")
    assert [(m["from"], m["to"]) for m in moves] == [(None, 1), (1, 2), (2, 3), (3, 2)]
    assert moves[2]["by"].startswith("outside loraflow") and moves[3]["by"] == "loraflow rollback from v3"
    # A second rollback steps further back; a version serving rejected is skipped.
    assert registry.rollback(cfg, "m").version == 1
    registry.promote(cfg, "m", 4)
    registry.set_version_tag(cfg, "m", 1, "serving_status", "rejected: load failed")
    with pytest.raises(LookupError, match="no earlier champion"):
        registry.rollback(cfg, "m")
    assert versions == [1, 2, 3, 4]


def test_history_under_concurrent_writers_loses_no_move_and_names_no_person(mlflow_server, tmp_path):
    """Promotions while two reconcilers (the serving side on every webhook) run against one real MLflow
    server: every move is in the history once, each by its real actor (the read-modify-write tag lost
    entries and noted loraflow's own moves as a person's)."""
    import threading

    cfg = RegistryConfig(tracking_uri=mlflow_server[0], artifact_root=str(mlflow_server[1]))
    for tag in ("one", "two", "three"):
        _register(cfg, tmp_path, tag)
    stop, seen_errors = threading.Event(), []

    def reconciler() -> None:
        while not stop.is_set():
            try:
                registry.reconcile_history(cfg, "m")
            except Exception as e:  # noqa: BLE001 - reported below
                seen_errors.append(e)

    threads = [threading.Thread(target=reconciler) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for v in (1, 2, 3, 1, 2):
            registry.promote(cfg, "m", v, by="loraflow retrain")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not seen_errors
    moves = registry.history(cfg, "m")
    assert [(m["from"], m["to"], m["by"]) for m in moves] == [
        (None, 1, "loraflow retrain"), (1, 2, "loraflow retrain"), (2, 3, "loraflow retrain"),
        (3, 1, "loraflow retrain"), (1, 2, "loraflow retrain")]
    # A person's move (the UI's client call), noticed by two reconcilers at once: one entry, theirs.
    registry.client(cfg).set_registered_model_alias("m", "champion", "3")
    both = [threading.Thread(target=registry.reconcile_history, args=(cfg, "m")) for _ in range(2)]
    for t in both:
        t.start()
    for t in both:
        t.join()
    registry.promote(cfg, "m", 1, by="loraflow retrain")
    moves = registry.history(cfg, "m")
    assert [(m["from"], m["to"], m["by"]) for m in moves[5:]] == [(2, 3, registry.OUTSIDE), (3, 1, "loraflow retrain")]


def test_a_loraflow_move_in_flight_is_never_a_persons(cfg, tmp_path):
    """Between promote's intent and its move, and between the move and its completion, a reconcile (the
    webhook arrives at once) sees loraflow's move; a completion that could not be written stays loraflow's."""
    for tag in ("one", "two"):
        _register(cfg, tmp_path, tag)
    registry.promote(cfg, "m", 1, by="loraflow retrain")
    entry = {"id": "inflight", "at": registry._now(), "from": 1, "to": 2, "by": "loraflow retrain"}
    registry._write_entry(cfg, "m", "intent", entry)
    registry.reconcile_history(cfg, "m")  # before the move
    registry.client(cfg).set_registered_model_alias("m", "champion", "2")
    registry.reconcile_history(cfg, "m")  # after the move, no completion written (it failed)
    registry._write_entry(cfg, "m", "intent", {**entry, "id": "next", "at": registry._now(), "from": 2, "to": 1})
    registry.client(cfg).set_registered_model_alias("m", "champion", "1")
    moves = registry.reconcile_history(cfg, "m")
    assert [(m["from"], m["to"], m["by"]) for m in moves] == [
        (None, 1, "loraflow retrain"), (1, 2, "loraflow retrain"), (2, 1, "loraflow retrain")]
    assert registry.OUTSIDE not in {m["by"] for m in registry.history(cfg, "m")}


def test_serve_starts_vllm_on_the_base_its_champion_needs(cfg, tmp_path):
    """Base -> serve: new data rebuilt base.out_dir and the gate kept the champion; a restarted `loraflow
    serve` (or `down`/`up`) starts vLLM on the champion's base from the store, not on the new one (it
    rejected the healthy champion for good). Without that base, or without a champion, the current base."""
    from pipeline.config import BaseModelConfig, Params
    from pipeline.modeling import publish_base
    from pipeline.serve.endpoint import serving_base

    base_dir, store = tmp_path / "base", tmp_path / "bases"
    base_dir.mkdir()
    (base_dir / "config.json").write_text('{"hidden_size": 64}')
    (base_dir / "model.safetensors").write_bytes(b"yesterday's weights")
    old = publish_base(base_dir, store)
    p = Params(project={"name": "m"}, registry=cfg, base=BaseModelConfig(out_dir=str(base_dir), store_dir=str(store)))
    said = []
    assert serving_base(p, said.append) == old  # no model registered yet: the current base, from the store
    v1, _ = _register(cfg, tmp_path, "one")
    registry.set_version_tag(cfg, "m", v1.version, "base_weights_sha256", old.name)
    registry.promote(cfg, "m", v1.version)
    (base_dir / "model.safetensors").write_bytes(b"today's weights")
    publish_base(base_dir, store)
    assert serving_base(p, said.append) == old
    assert (store / "current").resolve().name != old.name  # the base built last
    import shutil

    for f in old.rglob("*"):
        f.chmod(0o644)
    shutil.rmtree(old)
    assert serving_base(p, said.append) == store / (store / "current").resolve().name
    assert "is not on this machine" in said[-1]


def test_the_base_store_keeps_every_base_a_version_in_the_alias_history_needs(cfg, tmp_path):
    """What may be removed: a base no version holding an alias or named in the alias history was trained
    on, not the current one, older than a day. A registry that cannot be read removes nothing."""
    import os

    from pipeline.config import BaseModelConfig, Params
    from pipeline.modeling import publish_base
    from pipeline.release.promotion import prune_bases

    base_dir, store = tmp_path / "base", tmp_path / "bases"
    base_dir.mkdir()
    (base_dir / "config.json").write_text('{"hidden_size": 64}')
    shas = []
    for i, tag in enumerate(("one", "two", "three", "four")):
        (base_dir / "model.safetensors").write_bytes(f"weights {i}".encode())
        shas.append(publish_base(base_dir, store).name)
        v, _ = _register(cfg, tmp_path, tag)
        registry.set_version_tag(cfg, "m", v.version, "base_weights_sha256", shas[-1])
    registry.promote(cfg, "m", 1)
    registry.promote(cfg, "m", 2)  # v1 stays in the history (a rollback target); v3 was never promoted
    for sha in shas:
        os.utime(store / sha, (0, 0))  # all old enough
    p = Params(project={"name": "m"}, registry=cfg, base=BaseModelConfig(out_dir=str(base_dir), store_dir=str(store)))
    down = p.model_copy(update={"registry": cfg.model_copy(update={"tracking_uri": "http://127.0.0.1:9", "retries": 0,
                                                                    "timeout_s": 2})})
    assert prune_bases(down, say=lambda _: None) == []  # could not read: nothing removed
    assert prune_bases(p, say=lambda _: None) == [shas[2]]  # v4's base is the current one
    assert sorted(x.name for x in store.iterdir() if not x.is_symlink()) == sorted([shas[0], shas[1], shas[3]])
