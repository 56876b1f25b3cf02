import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import DEPLOYMENT_SECTIONS, ConfigError, Params, load_params

ROOT = Path(__file__).resolve().parents[1]


def test_committed_params_load_and_match_defaults_where_documented():
    p = load_params(ROOT / "params.yaml")
    assert p.train.lora_r == 16
    assert p.registry.alias == "champion"
    assert p.serve.base_url == "http://127.0.0.1:8000"


def _write(tmp_path, mutate):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(raw)
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


@pytest.mark.parametrize("mutate, key", [
    (lambda r: r["train"].update(lora_dropout=1.5), "train.lora_dropout"),
    (lambda r: r["train"].update(learning_rate=1e-4), "train.learning_rate: moved to train.trl.learning_rate"),
    (lambda r: r["train"].update(lora_rank=8), "train.lora_rank"),
    (lambda r: r["gate"].update(metric="bleu"), "gate.metric"),
    (lambda r: r["base"]["builtin"].update(hidden_size=250), "base.builtin"),
    (lambda r: r["base"].update(hidden_size=256), "base.hidden_size: moved to base.builtin.hidden_size"),
    (lambda r: r["task"].update(kind="regex"), "task.kind: unknown answer kind 'regex'"),
    (lambda r: r["serve"].update(port=70000), "serve.port"),
    (lambda r: r.update(trian={}), "trian"),
])
def test_bad_value_names_the_key(tmp_path, mutate, key):
    f = _write(tmp_path, mutate)
    with pytest.raises(ConfigError) as err:
        load_params(f)
    assert f"{f}: {key}" in str(err.value)


def test_unknown_key_is_called_unknown(tmp_path):
    f = _write(tmp_path, lambda r: r["train"].update(lora_rank=8))
    with pytest.raises(ConfigError, match="unknown key"):
        load_params(f)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_cli_stops_before_any_work_on_bad_params(tmp_path):
    f = _write(tmp_path, lambda r: r["train"]["trl"].update(num_train_epochs=1, lerning_rate=0.1))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--params", str(f)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    # The TRL key is checked against the installed TRL before anything starts, with the field meant.
    assert "train.trl.lerning_rate: not a field of TRL" in proc.stderr and "learning_rate?" in proc.stderr
    # Nothing was started: no Prefect home, no MLflow store, no DVC outputs in the working directory.
    assert not any(tmp_path.glob(".prefect")) and not (tmp_path / "mlflow").exists()


def test_defaults_and_the_shipped_params_are_valid():
    d = Params()
    assert (d.task.kind, d.gate_metric, d.base.is_builtin) == ("text", "exact_match", True)
    assert d.train.trl_value("learning_rate") == 2e-3 and d.train.trl == {}  # loraflow's default, not TRL's
    shipped = load_params(ROOT / "params.yaml")
    assert shipped.task.kind == "json" and shipped.gate_metric == "exact_match"
    assert shipped.train.trl_value("num_train_epochs") == 3 and shipped.train.seed == 0
    assert shipped.base.builtin.pretrain_steps == 900


def test_overlay_changes_deployment_sections_only(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    ov = tmp_path / "prod.yaml"
    ov.write_text("extends: params.yaml\nserve: {url: 'http://vllm:8000', dtype: bfloat16}\n")
    p = load_params(ov)
    assert p.serve.base_url == "http://vllm:8000" and p.serve.dtype == "bfloat16"
    assert p.serve.port == 8000 and p.train.lora_r == 16  # untouched keys come from the base file
    ov.write_text("extends: params.yaml\ntrain: {trl: {num_train_epochs: 1}}\n")
    with pytest.raises(ConfigError, match="prod.yaml: train: an overlay may only set"):
        load_params(ov)


def test_every_deploy_overlay_is_valid():
    overlays = list((ROOT / "deploy").rglob("params*.yaml"))
    assert overlays
    base = load_params(ROOT / "params.yaml").model_dump()
    for f in overlays:
        p = load_params(f).model_dump()
        changed = {k for k in p if p[k] != base[k]}
        assert changed and changed <= DEPLOYMENT_SECTIONS, (f, changed)  # it changes something, and only those


@pytest.mark.parametrize("change, message", [
    ({"train": {"lora_r": 32}}, r"train.lora_r: 32 is above serve.max_lora_rank \(16\)"),
    ({"serve": {"max_loras": 1}}, r"serve.max_loras: 1 cannot hold 1 served model"),
    ({"serve": {"models": ["a", "b"], "max_loras": 2}}, r"set it to at least 3"),
])
def test_combinations_that_would_only_fail_in_serving_stop_at_start(change, message):
    from pipeline.config import Params

    with pytest.raises(ValueError, match=message):
        Params(**change)


def test_the_gpu_profile_writes_its_keys_into_params_and_keeps_the_rest(tmp_path):
    from pipeline.config import apply_profile, load_params

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_text()
    changed = apply_profile(params, ROOT / "profiles/gpu.yaml")
    p = load_params(params)
    assert p.train.adapter == "qlora" and p.train.packing and p.evaluate.vllm == {"gpu_memory_utilization": 0.25}
    assert p.serve.dtype == "bfloat16" and p.train.trl["use_liger_kernel"] is True
    assert {"train.adapter", "evaluate.vllm.gpu_memory_utilization", "serve.dtype", "base.model"} <= set(changed)
    after = params.read_text()
    # Every other line the user wrote stays, comments included; null stays null.
    kept = [line for line in before.splitlines() if line.strip().startswith("#")]
    assert all(line in after for line in kept)
    assert p.curate.teacher is None and "teacher: null" in after
    assert p.sanitize == load_params(ROOT / "params.yaml").sanitize
    assert apply_profile(params, ROOT / "profiles/gpu.yaml") == []  # applied twice: nothing more changes


def test_a_bad_profile_names_itself_and_the_key_and_writes_nothing(tmp_path):
    from pipeline.config import ConfigError, apply_profile

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  adapter: qlora\n  lora_rank: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*train.lora_rank"):
        apply_profile(params, bad)
    assert params.read_text() == before
