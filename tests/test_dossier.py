"""The compliance dossier of a DP-trained version, released through the real gate and registry (a real
MLflow tracking server on localhost); the demo's champion is checked in tests/test_end_to_end.py."""

import json
from pathlib import Path

import mlflow.artifacts
import pytest

from pipeline import registry
from pipeline.canaries import make_canaries
from tests.conftest import release_params
from pipeline.layout import serving_log
from pipeline.release import dossier, promotion
from pipeline.release.gate import ModelScore
from pipeline.stages import rescorer
from pipeline.train.trainer import train

N = 40


@pytest.fixture
def released(tmp_path, monkeypatch, tiny_base, clean_demo, mlflow_server):
    """v1 of model `m`: a DP adapter trained on the demo data with canaries planted, gated and promoted."""
    monkeypatch.chdir(tmp_path)
    p = release_params(
        tmp_path, tiny_base, clean_demo, mlflow_server,
        train={"checkpoint_dir": str(tmp_path / "ckpt"), "lora_r": 4, "lora_alpha": 8, "fused_lora": False,
               "privacy": {"enabled": True, "target_epsilon": 3.0},
               "trl": {"max_steps": 12, "per_device_train_batch_size": 8, "save_steps": 6}},
        evaluate={"max_examples": N}, serve={"traffic_log": str(tmp_path / "serving/requests.jsonl")})
    aug = Path(p.augment.out_dir)
    canaries = make_canaries(p.probes)
    train(p.train, tiny_base, aug / "train.jsonl", canaries=canaries)
    cand, base = _scores(p)
    out = promotion.release(p, cand, base, rescorer(p))
    assert out["promoted"]
    return p, canaries


def _scores(p):
    privacy = json.loads(Path(p.train.out_dir, "train_metrics.json").read_text())["privacy"]
    same = {"rouge_l": 0.5, "chrf": 0.5}  # the text task's guardrails, measured for both as evaluate does
    return (ModelScore("candidate", {"exact_match": 1.0, "valid": 1.0, **same}, {"exact_match": [1.0] * N, "valid": [1.0] * N},
                       privacy=privacy, speed={"tokens_per_s": 100.0}),
            ModelScore("base", {"exact_match": 0.0, "valid": 1.0, **same}, {"exact_match": [0.0] * N, "valid": [1.0] * N},
                       speed={"tokens_per_s": 100.0}))


def test_dossier_of_a_dp_version_is_filled_from_the_registry(released, tmp_path):
    p, canaries = released
    log = serving_log(p)
    log.parent.mkdir(parents=True)
    log.write_text("\n".join(json.dumps(e) for e in [
        {"at": "2026-12-01T10:00:00+00:00", "event": "served", "model": "m", "version": 1, "previous": None},
        {"at": "2026-12-01T11:00:00+00:00", "event": "stopped", "model": "m", "version": 1},
        {"at": "2026-12-01T12:00:00+00:00", "event": "served", "model": "m", "version": 1, "previous": None},
        {"at": "2026-12-01T12:30:00+00:00", "event": "served", "model": "other", "version": 7}]) + "\n")
    md_path, page = dossier.publish(p.registry, "m", None, tmp_path / "doss", log)
    md, html = md_path.read_text(), page.read_text()
    c = registry.client(p.registry)
    v1 = registry.get_alias(p.registry, "m")
    run = c.get_run(v1.run_id)

    # Privacy: the epsilon the accountant gave, as MLflow recorded it, in the card and in both documents.
    eps = run.data.metrics["privacy_epsilon"]
    assert 0 < eps <= 3.0 * 1.02 and v1.tags["privacy_epsilon"] == str(eps)
    assert f"epsilon {eps:.3f}, delta " in md and f"epsilon {eps:.3f}, delta " in html
    assert "RDP accountant" in md and f"noise multiplier {run.data.metrics['privacy_noise_multiplier']:g}" in md
    assert "DP-SGD" in (registry.download_adapter(p.registry, v1, Path("dl")) / "README.md").read_text()

    # Data lineage: the sanitize report MLflow holds, number for number.
    got = Path(mlflow.artifacts.download_artifacts(run_id=v1.run_id, artifact_path="data/report.json", dst_path="a"))
    rep = json.loads(got.read_text())
    by_reason = ", ".join(f"{k} {v}" for k, v in sorted(rep["quarantined"]["by_reason"].items()))
    assert f"| train | {rep['read']} | {rep['kept']} | {rep['quarantined']['total']} | {by_reason} |" in md
    assert ", ".join(f"{k} {v}" for k, v in sorted(rep["redactions"]["by_type"].items())) in md
    assert f"**training data sha256**: {v1.tags['train_data_sha256']}" in md
    # Evaluation and the gate: each check, the interval tag's numbers.
    assert "| improvement | pass |" in md and "| validity | pass |" in md
    assert v1.tags["gate_interval"].split(" ")[0] in md
    # Approvals, serving periods (other models' lines ignored), cost.
    assert "| none -> v1 | loraflow retrain (gate passed) | gate (automatic, after the gate passed) |" in md
    assert "| 2026-12-01T10:00:00+00:00 | 2026-12-01T11:00:00+00:00 | stopped |" in md
    assert "| 2026-12-01T12:00:00+00:00 | still serving | - |" in md
    assert f"**price per GPU-hour**: {p.train.gpu_hour_price}" in md
    for n in range(1, 10):
        assert f"## {n}. " in md
    assert "EU AI Act (Regulation (EU) 2024/1689), Annex IV" in md
    # No canary value anywhere; their hashes are there.
    for canary in canaries:
        assert canary.secret not in md and canary.secret not in html and canary.digest in md
    # Logged to the version's run.
    assert {f.path for f in c.list_artifacts(v1.run_id, "dossier")} == {"dossier/m-v1.md", "dossier/m-v1.html"}


def test_gate_bound_on_epsilon_holds_the_version_and_the_dossier_says_why(released):
    p, _ = released
    strict = p.model_copy(update={"gate": p.gate.model_copy(update={"max_epsilon": 0.5})})
    Path(p.train.out_dir, "extra.txt").write_text("another adapter")  # another adapter hash: a new version
    out = promotion.release(strict, *_scores(strict), rescorer(strict))
    assert out["newly_registered"] and not out["promoted"]
    assert out["decision"]["checks"]["privacy"] is False
    md = dossier.write(p.registry, "m", out["registered_version"], Path("doss"))[0].read_text()
    assert "| privacy | FAIL |" in md and "bound 0.500" in md and "**max epsilon**: 0.5" in md


def test_serving_periods_name_the_bad_line():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp, "serving.jsonl")
        log.write_text('{"at": "t", "event": "served", "model": "m", "version": 1}\nnot json\n')
        with pytest.raises(ValueError, match="serving.jsonl:2: not a JSON line"):
            dossier.serving_periods(log, "m", 1)
        assert dossier.serving_periods(Path(tmp, "absent.jsonl"), "m", 1) == []


def test_a_missing_version_or_an_unreachable_registry_is_an_error_not_an_empty_dossier(released, tmp_path):
    p, _ = released
    with pytest.raises(LookupError, match="m v99 is not registered"):
        dossier.gather(p.registry, "m", 99)
    # A registry that does not answer (nothing listens there): retried, then RegistryUnavailable; no file.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = p.registry.model_copy(update={"tracking_uri": f"http://127.0.0.1:{port}", "retries": 1,
                                         "retry_backoff_s": 0.1, "timeout_s": 2.0})
    with pytest.raises(registry.RegistryUnavailable):
        dossier.write(down, "m", 1, tmp_path / "none")
    assert not (tmp_path / "none").exists()
