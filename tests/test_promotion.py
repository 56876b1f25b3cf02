"""Promotion as a transaction, against a real MLflow tracking server on localhost.

Failures are injected by replacing one registry call for one attempt (the registry itself is real);
after each, the registry must be consistent and a re-run must finish what the gate decided.
"""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import release_params
from pipeline import registry
from pipeline.release import promotion
from pipeline.release.gate import Decision, ModelScore
from pipeline.release.lock import LockTimeout, retrain_lock
from pipeline.stages import rescorer

N = 40


def _adapter(base_dir: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from pipeline.modeling import load_base

    torch.manual_seed(seed)
    model, tok = load_base(base_dir)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).save_pretrained(out)
    (out / "train_metrics.json").write_text(json.dumps({"steps": 1, "loss_curve": [], "canaries": []}))
    return out


@pytest.fixture
def setup(tmp_path, monkeypatch, tiny_base, clean_demo, mlflow_server):
    """Params for model `m` on a real MLflow server; ``adapter(seed)`` makes the trained adapter."""
    monkeypatch.chdir(tmp_path)
    p = release_params(tmp_path, tiny_base, clean_demo, mlflow_server, evaluate={"max_examples": N})

    def adapter(seed: int) -> Path:
        import shutil

        shutil.rmtree(p.train.out_dir, ignore_errors=True)
        return _adapter(tiny_base, Path(p.train.out_dir), seed)

    return p, adapter


def _scores(win: bool = True) -> tuple[ModelScore, ModelScore]:
    cand = [1.0] * N if win else [0.0] * N
    # What the evaluate stage measures for both (the text task's guardrail metrics, the speed): the gate
    # fails what it cannot compute.
    same = {"rouge_l": 0.5, "chrf": 0.5}
    return (ModelScore("candidate", {"exact_match": sum(cand) / N, "valid": 1.0, **same},
                       {"exact_match": cand, "valid": [1.0] * N}, speed={"tokens_per_s": 100.0}),
            ModelScore("base", {"exact_match": 0.0, "valid": 1.0, **same}, {"exact_match": [0.0] * N, "valid": [1.0] * N},
                       speed={"tokens_per_s": 100.0}))


def _versions(p) -> dict[int, dict]:
    c = registry.client(p.registry)
    return {int(v.version): dict(v.tags) for v in c.search_model_versions("name = 'm'")}


def test_first_release_registers_with_lineage_card_and_interval(setup):
    p, adapter = setup
    adapter(0)
    out = promotion.release(p, *_scores(), rescorer(p))
    assert out["promoted"] and out["newly_registered"] and out["registered_version"] == 1
    tags = _versions(p)[1]
    assert tags["promotion"] == "done" and tags["gate_promote"] == "true" and tags["gate_alias_version"] == "none"
    assert tags["gate_interval"].startswith("+1.0000 [+1.0000, +1.0000] 95% n=40")
    assert tags["base_sha256"] and tags["base_weights_sha256"] and tags["params_sha256"]
    # The Hugging Face card sits next to the adapter: the folder can be pushed to a hub unchanged.
    got = registry.download_adapter(p.registry, registry.get_alias(p.registry, "m"), Path("dl"))
    card = (got / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft" and front["base_model"] == "loraflow/builtin-tiny-llama"
    assert "exact_match" in front["metrics"] and front["model-index"][0]["results"][0]["metrics"]
    assert "95% CI [+1.0000, +1.0000]" in card and (got / "adapter_model.safetensors").is_file()


def test_failure_after_registration_is_completed_by_a_rerun(setup, monkeypatch):
    p, adapter = setup
    adapter(0)
    real = registry.promote

    def crash(*a, **k):
        raise ConnectionError("injected: MLflow went away before the alias move")

    monkeypatch.setattr(registry, "promote", crash)
    with pytest.raises(ConnectionError):
        promotion.release(p, *_scores(), rescorer(p))
    assert _versions(p)[1]["promotion"] == "pending" and registry.get_alias(p.registry, "m") is None

    monkeypatch.setattr(registry, "promote", real)
    out = promotion.release(p, *_scores(), rescorer(p))
    assert out["promoted"] and not out["newly_registered"]
    assert list(_versions(p)) == [1] and _versions(p)[1]["promotion"] == "done"
    assert registry.get_alias(p.registry, "m").version == 1


def test_a_version_that_failed_its_gate_is_gated_again_when_the_gate_settings_change(setup):
    """Seen on the H200: v1 learnt its task but failed the speed guardrail; the user loosened
    gate.max_slowdown and ran again; every stage was unchanged, so v1 kept its old decision."""
    from dataclasses import replace

    p, adapter = setup
    adapter(0)
    cand, base = _scores()
    cand, base = replace(cand, speed={"tokens_per_s": 40.0}), replace(base, speed={"tokens_per_s": 100.0})
    out = promotion.release(p, cand, base, rescorer(p))
    assert out["newly_registered"] and not out["promoted"] and "guardrails" in _versions(p)[1]["gate_failed"]
    # Same settings: the decision stands (nothing to redo).
    again = promotion.release(p, cand, base, rescorer(p))
    assert not again["promoted"] and "keep the champion" in again["note"] and not again.get("regated")
    # A stricter change still fails, and says it decided again.
    strict = p.model_copy(update={"gate": p.gate.model_copy(update={"min_improvement": 0.5, "max_slowdown": 0.55})})
    out = promotion.release(strict, cand, base, rescorer(strict))
    assert out["regated"] and not out["promoted"] and "again" in out["note"]
    assert "## Gate decision: keep the current champion" in registry.client(p.registry).get_model_version("m", "1").description
    # Loosened: the same scores pass now, v1 is promoted, no second version registered.
    loose = p.model_copy(update={"gate": p.gate.model_copy(update={"max_slowdown": 0.7})})
    out = promotion.release(loose, cand, base, rescorer(loose))
    assert out["promoted"] and out["regated"] and not out["newly_registered"] and out["registered_version"] == 1
    tags = _versions(p)[1]
    assert list(_versions(p)) == [1] and tags["promotion"] == "done" and tags["gate_promote"] == "true"
    assert tags["gate_settings"] == promotion.gate_settings_sha(loose) and registry.get_alias(p.registry, "m").version == 1
    # The card a person reads in the MLflow UI, and reports/README.md, say the decision that stands now.
    described = registry.client(p.registry).get_model_version("m", "1").description
    assert "## Gate decision: PROMOTE" in described and "keep the current champion" not in described
    assert "## Gate decision: PROMOTE" in Path("reports/README.md").read_text()
    # The dossier, read from the registry as an auditor reads it, says the same decision and its settings
    # (it showed the first decision, logged at registration, and the run's first gate parameters).
    from pipeline.release import dossier

    facts = dossier.gather(p.registry, "m", 1)
    assert facts.reports["gate"]["promote"] is True and facts.reports["gate"]["gate_settings"]["max_slowdown"] == 0.7
    text = dossier.to_markdown(facts, dossier.sections(facts))
    assert "**Decision: promote**" in text and "gate_promote=true" in text


def test_failure_after_the_alias_move_is_consistent_and_a_rerun_finishes(setup, monkeypatch):
    p, adapter = setup
    adapter(0)
    real = promotion._tag

    def crash(p_, version, **tags):
        if tags.get("promotion") == "done":
            raise ConnectionError("injected: crash right after the alias move")
        real(p_, version, **tags)

    monkeypatch.setattr(promotion, "_tag", crash)
    with pytest.raises(ConnectionError):
        promotion.release(p, *_scores(), rescorer(p))
    assert registry.get_alias(p.registry, "m").version == 1  # the alias moved: serving follows v1
    monkeypatch.setattr(promotion, "_tag", real)
    out = promotion.release(p, *_scores(), rescorer(p))
    assert out["promoted"] and list(_versions(p)) == [1] and _versions(p)[1]["promotion"] == "done"


def test_an_alias_moved_by_hand_during_the_run_is_not_overwritten(setup, monkeypatch):
    p, adapter = setup
    adapter(0)
    promotion.release(p, *_scores(), rescorer(p))                      # v1 champion
    adapter(1)
    promotion.release(p, *_scores(win=False), rescorer(p))             # v2 registered, gate failed (held)
    assert registry.get_alias(p.registry, "m").version == 1
    adapter(2)
    real_gate = promotion.gate
    calls = []

    def gate_then_person_moves_alias(p_, cand, base, rescore):
        decision, champion = real_gate(p_, cand, base, rescore)
        calls.append(champion.version)
        if len(calls) == 1:  # a person promotes v2 in the MLflow UI while this run is between gate and move
            registry.client(p_.registry).set_registered_model_alias("m", "champion", "2")
            return Decision(True, f"champion v{champion.version}", ["injected pass"], "exact_match"), champion
        return decision, champion

    monkeypatch.setattr(promotion, "gate", gate_then_person_moves_alias)
    out = promotion.release(p, *_scores(win=False), rescorer(p))        # re-gated against v2: a loser is not promoted
    assert calls == [1, 2]
    assert not out["promoted"] and registry.get_alias(p.registry, "m").version == 2
    assert _versions(p)[3]["gate_alias_version"] == "2" and _versions(p)[3]["promotion"] == "held"


def test_compare_and_set_refuses_a_moved_alias(setup):
    p, adapter = setup
    adapter(0)
    promotion.release(p, *_scores(), rescorer(p))
    adapter(1)
    promotion.release(p, *_scores(win=False), rescorer(p))
    with pytest.raises(registry.AliasMoved, match="points at v1, not no version"):
        registry.promote(p.registry, "m", 2, expected=None)
    registry.promote(p.registry, "m", 2, expected=1)
    c = registry.client(p.registry)
    assert c.get_model_version_by_alias("m", "previous_champion").version == "1"


def test_two_retrains_at_once_register_one_version(setup):
    p, adapter = setup
    adapter(0)
    results, errors = [], []

    def run():
        try:
            with retrain_lock("m", say=lambda m: None):
                results.append(promotion.release(p, *_scores(), rescorer(p), say=lambda m: None))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert list(_versions(p)) == [1]
    assert sorted(r["newly_registered"] for r in results) == [False, True]


def test_the_lock_holds_across_processes_and_says_who_holds_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time, pathlib; from pipeline.release.lock import retrain_lock\n"
        f"with retrain_lock('m', lock_dir=pathlib.Path({str(tmp_path)!r})):\n"
        "    print('held', flush=True); time.sleep(30)")], stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        said = []
        started = time.monotonic()
        with pytest.raises(LockTimeout, match=f"pid {holder.pid}"):
            with retrain_lock("m", timeout_s=1.0, lock_dir=tmp_path, say=said.append):
                pass
        assert time.monotonic() - started >= 1.0 and "another retrain of m is running" in said[0]
    finally:
        holder.kill()
        holder.wait()
    with retrain_lock("m", timeout_s=5, lock_dir=tmp_path):  # a dead holder's lock is gone with it
        pass
