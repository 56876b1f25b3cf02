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
    with pytest.raises(LookupError, match="no previous champion"):
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

    metrics = registry.metric_history(cfg, v1.run_id)
    assert metrics["train_loss"] == 1.0 and metrics["candidate_exact_match"] == 0.9


def test_promoting_a_missing_version_fails(cfg, tmp_path):
    _register(cfg, tmp_path, "one")
    with pytest.raises(Exception, match="(?i)not found|does not exist|RESOURCE_DOES_NOT_EXIST"):
        registry.promote(cfg, "m", 7)
