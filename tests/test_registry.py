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


def test_champion_of_another_base_is_no_reference(cfg, tmp_path):
    # Serving would put that champion's adapter on today's base: the candidate must clear the
    # first-version bar against the base model, not tie with the champion's old numbers.
    from pipeline.release import promotion as release  # noqa: I001
    from pipeline.config import BaseModelConfig, Params
    from pipeline.release.gate import ModelScore

    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (base_dir / "config.json").write_text('{"hidden_size": 64}')
    (base_dir / "model.safetensors").write_bytes(b"today's weights")
    v1, _ = _register(cfg, tmp_path, "old-base")  # tagged without today's base hashes
    registry.promote(cfg, "m", v1.version)
    p = Params(project={"name": "m"}, registry=cfg, base=BaseModelConfig(out_dir=str(base_dir)))

    candidate = ModelScore("candidate", {"exact_match": 0.9, "valid": 1.0}, {"exact_match": [1] * 36 + [0] * 4})
    base = ModelScore("base", {"exact_match": 0.0, "valid": 0.0}, {"exact_match": [0] * 40})
    def never(adapter):  # an adapter of another base cannot even run on today's: it is not re-scored
        raise AssertionError(f"re-scored {adapter}")

    decision, champion = release.gate(p, candidate, base, never)
    assert champion.version == 1
    assert decision.promote and decision.reference == "base" and decision.interval.n == 40
    assert "champion v1 was trained on another base" in decision.reasons[-1]

    worse = ModelScore("candidate", {"exact_match": 0.01, "valid": 1.0}, {"exact_match": [0] * 40})
    assert not release.gate(p, worse, base, never)[0].promote


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


def test_a_promotion_the_serving_side_noticed_first_is_recorded_once_as_loraflows(cfg, tmp_path, monkeypatch):
    """The alias move fires MLflow's webhook and the serving side reconciles the history, before or after
    promote notes the move (seen with `loraflow up`: the first promotion listed twice, once as made outside
    loraflow)."""
    for tag in ("one", "two"):
        _register(cfg, tmp_path, tag)
    real = registry.record_move

    def webhook_first(cfg_, name, before, after, by, since=None):
        if by.startswith("loraflow retrain"):  # promote's own note: the serving side got there first
            registry.reconcile_history(cfg_, name)
        real(cfg_, name, before, after, by, since=since)

    monkeypatch.setattr(registry, "record_move", webhook_first)
    registry.promote(cfg, "m", 1, by="loraflow retrain")
    registry.promote(cfg, "m", 2, by="loraflow retrain")
    moves = registry.history(cfg, "m")
    assert [(m["from"], m["to"], m["by"]) for m in moves] == [(None, 1, "loraflow retrain"), (1, 2, "loraflow retrain")]
    # The other order (seen with `loraflow up`): the serving side read the history before promote noted
    # the move, and notes it as an outside move after. The history already ends there: nothing to add.
    registry.record_move(cfg, "m", None, 2, registry.OUTSIDE)
    assert len(registry.history(cfg, "m")) == 2
    # A move a person makes in the UI is still theirs, and loraflow's next move is noted after it.
    registry.client(cfg).set_registered_model_alias("m", "champion", "1")
    registry.promote(cfg, "m", 2, by="loraflow retrain")
    moves = registry.history(cfg, "m")
    assert [(m["from"], m["to"]) for m in moves[2:]] == [(2, 1), (1, 2)]
    assert moves[2]["by"] == registry.OUTSIDE and moves[3]["by"] == "loraflow retrain"
