"""The real TRL + peft training paths on a tiny CPU model (seconds, not minutes)."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ConfigError, EvaluateConfig, Params, TaskConfig, TrainConfig, parse_params
from pipeline.evaluate.scoring import evaluate_model
from pipeline.train.trainer import mix_generic, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(clean_demo):
    return clean_demo


def tiny_cfg(tmp: Path, **kw) -> TrainConfig:
    trl = {**dict(max_steps=12, per_device_train_batch_size=8, logging_steps=2, save_steps=4), **kw.pop("trl", {})}
    base = dict(out_dir=str(tmp / "adapter"), checkpoint_dir=str(tmp / "ckpt"), lora_r=4, lora_alpha=8, trl=trl)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tiny_base, data, tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    before = {k: v.clone() for k, v in load_file(tiny_base / "model.safetensors").items()}
    metrics = train(tiny_cfg(d), tiny_base, data / "train/clean.jsonl", data / "eval/clean.jsonl")
    return d, before, metrics


def test_writes_adapter_metrics_and_lineage(trained):
    d, _, metrics = trained
    files = {p.name for p in (d / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "train_metrics.json", "train_meta.json",
            "tokenizer.json"} <= files
    meta = json.loads((d / "adapter/train_meta.json").read_text())
    assert meta["config"]["trl"]["max_steps"] == 12 and len(meta["inputs"]) == 2
    assert meta["trl"]["max_steps"] == 12 and meta["trl"]["learning_rate"] == 2e-3  # the user's, loraflow's default
    assert metrics["steps"] == 12 and len(metrics["loss_curve"]) == 6 and metrics["tokens_seen"] > 0
    assert len(metrics["eval_loss_curve"]) == 3  # every checkpoint_steps
    assert metrics["loss_curve"][-1]["loss"] < metrics["loss_curve"][0]["loss"]
    assert metrics["gpu_hours"] == 0.0 and metrics["device"] == "cpu"
    assert not any((d / "ckpt").glob("*/checkpoint-*")), "checkpoints must be removed after success"


def test_base_weights_unchanged_and_adapter_trained(trained, tiny_base):
    d, before, _ = trained
    after = load_file(tiny_base / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    adapter = load_file(d / "adapter/adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: non-zero means it trained
    cfg = json.loads((d / "adapter/adapter_config.json").read_text())
    targets = {t.rsplit(".", 1)[-1] for t in cfg["target_modules"]}
    assert cfg["r"] == 4 and targets >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_evaluate_scores_the_adapter_per_example(trained, tiny_base, data, tmp_path):
    d, _, _ = trained
    cfg = EvaluateConfig(out_dir=str(tmp_path), max_examples=8)
    task = TaskConfig(kind="json", max_new_tokens=8)
    res = evaluate_model(tiny_base, d / "adapter", data / "eval/clean.jsonl", cfg, task)
    assert res["n"] == 8 and len(res["per_example"]["exact_match"]) == 8 and len(res["reasons"]) == 8
    s, per = res["summary"], res["per_example"]
    assert s == {m: round(sum(v) / len(v), 4) for m, v in per.items()}  # summaries are per-example means
    assert all(e <= f <= j for e, f, j in zip(per["exact_match"], per["field_accuracy"], per["json_valid"]))
    # The scorer is not stuck at zero: the references themselves score 1 on every metric.
    from pipeline.evaluate.scoring import score_predictions
    from pipeline.io import load_chat_file
    from pipeline.tasks import build_task

    rows = load_chat_file(data / "eval/clean.jsonl")[:8]
    perfect = score_predictions(build_task(task), [r["completion"][0]["content"] for r in rows], rows)
    assert set(perfect["summary"].values()) == {1.0} and perfect["reasons"] == [""] * 8
    # An answer the parser rejects scores 0 with its reason; it does not stop the evaluation.
    assert all(r.startswith("not valid JSON") for r, v in zip(res["reasons"], res["per_example"]["json_valid"]) if not v)


def test_early_stopping_stops_before_max_steps(tiny_base, data, tmp_path):
    # A learning rate this low cannot improve eval loss by much, so patience 1 ends the run early.
    cfg = tiny_cfg(tmp_path, early_stopping_patience=1, trl=dict(max_steps=60, learning_rate=1e-7, save_steps=4))
    m = train(cfg, tiny_base, data / "train/clean.jsonl", data / "eval/clean.jsonl")
    assert m["stopped_early"] and m["steps"] < 60 and m["best_eval_loss"] is not None


_KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from transformers import TrainerCallback
from pipeline.config import TrainConfig
from pipeline.train.trainer import train

class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kw):
        if state.global_step == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)

cfg = TrainConfig.model_validate_json(sys.argv[1])
kill = [KillAfterSave()] if int(sys.argv[2]) else []
train(cfg, Path(sys.argv[3]), Path(sys.argv[4]), None, extra_callbacks=kill)
"""


def _run(cfg: TrainConfig, kill_at: int, base: Path, train_file: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _KILL_SCRIPT, cfg.model_dump_json(), str(kill_at), str(base),
                           str(train_file)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_sigkilled_run_resumes_and_matches_an_uninterrupted_run(tiny_base, data, tmp_path):
    train_file = data / "train/clean.jsonl"
    cfg = tiny_cfg(tmp_path / "a", trl=dict(max_steps=16, save_steps=8))
    killed = _run(cfg, 8, tiny_base, train_file)
    assert killed.returncode == -signal.SIGKILL
    assert list((tmp_path / "a/ckpt").glob("*/checkpoint-8")), "no checkpoint left by the killed run"
    resumed = _run(cfg, 0, tiny_base, train_file)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    assert json.loads((tmp_path / "a/adapter/train_metrics.json").read_text())["resumed_from_step"] == 8

    straight = tiny_cfg(tmp_path / "b", trl=dict(max_steps=16, save_steps=8))
    assert _run(straight, 0, tiny_base, train_file).returncode == 0
    a = load_file(tmp_path / "a/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "b/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def _preference_margin(model, tok, rows) -> float:
    """Mean log p(chosen) - log p(rejected) of the answer tokens, given the prompt."""
    total = 0.0
    for r in rows:
        prompt = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
        logps = []
        for key in ("chosen", "rejected"):
            ids = tok(prompt + r[key][0]["content"] + tok.eos_token, add_special_tokens=False,
                      return_tensors="pt").input_ids
            with torch.no_grad():
                logp = model(ids).logits[0, :-1].log_softmax(-1)
            target = ids[0, 1:]
            logps.append(logp[torch.arange(len(target)), target][n_prompt - 1:].sum().item())
        total += logps[0] - logps[1]
    return total / len(rows)


def test_dpo_raises_the_preference_margin(tiny_base, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.train.trainer import load_preference_file

    from pipeline.config import SanitizeConfig
    from pipeline.data.sanitize import sanitize_files

    sanitize_files([ROOT / "data/raw/tickets_preference.jsonl"], tmp_path / "pref", SanitizeConfig(),
                   shape="preference")
    pref = tmp_path / "pref/clean.jsonl"
    cfg = tiny_cfg(tmp_path, method="dpo", lora_r=8, lora_alpha=16,
                   trl=dict(max_steps=60, learning_rate=5e-2, beta=0.5, max_length=128, save_steps=30))
    m = train(cfg, tiny_base, data / "train/clean.jsonl", None, preference_file=pref)
    assert m["method"] == "dpo" and m["steps"] == 60
    rows = load_preference_file(pref)[:64]
    tok = AutoTokenizer.from_pretrained(tiny_base)
    before = _preference_margin(AutoModelForCausalLM.from_pretrained(tiny_base), tok, rows)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path / "adapter")
    assert _preference_margin(tuned, tok, rows) > before + 0.01


def test_preference_records_are_sanitized_like_training_data(tmp_path):
    from pipeline.config import SanitizeConfig
    from pipeline.data.sanitize import sanitize_files
    from pipeline.tasks import build_task

    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "q", "chosen": "a"}\n'
                 '{"prompt": "mail me at jane@example.com", "chosen": "{\\"ok\\": 1}", "rejected": "no"}\n'
                 '{"prompt": "q2", "chosen": "not json", "rejected": "{}"}\n')
    r = sanitize_files([f], tmp_path / "out", SanitizeConfig(), task=build_task(TaskConfig(kind="json")),
                       shape="preference")
    assert r["kept"] == 1 and r["quarantined"]["by_reason"] == {"invalid_answer": 1, "unknown_format": 1}
    q = [json.loads(x) for x in (tmp_path / "out/quarantine.jsonl").read_text().splitlines()]
    assert q[0]["line"] == 1 and "lacks ['rejected']" in q[0]["detail"]
    kept = json.loads((tmp_path / "out/clean.jsonl").read_text())
    assert kept["prompt"] == [{"role": "user", "content": "mail me at <EMAIL>"}] and kept["chosen"] == '{"ok": 1}'


def test_dora_and_merged_export_match_the_adapter(tiny_base, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = tiny_cfg(tmp_path, adapter="dora", merge_export=True, trl=dict(max_steps=4))
    train(cfg, tiny_base, data / "train/clean.jsonl", None)
    assert json.loads((tmp_path / "adapter/adapter_config.json").read_text())["use_dora"] is True
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path / "adapter")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter/merged")
        assert torch.allclose(peft(ids).logits, merged(ids).logits, atol=1e-4)


def test_generic_data_is_mixed_at_the_configured_share(data):
    rows = [{"prompt": [], "completion": []}] * 190
    mixed, n = mix_generic(rows, ROOT / "data/raw/generic_chat.jsonl", 0.05, seed=0)
    assert n == 10 and len(mixed) == 200


@pytest.mark.parametrize("change, message", [
    ({"train": {"method": "ppo"}}, "train.method"),
    ({"train": {"adapter": "ia3"}}, "train.adapter"),
    ({"train": {"generic_fraction": 0.1}, "data": {"generic": ""}}, "train.generic_fraction: > 0 needs data.generic"),
    ({"train": {"method": "dpo", "packing": True}}, "packing is not supported with method: dpo"),
    ({"train": {"lr_scheduler": "cosine"}}, "train.lr_scheduler: moved to train.trl.lr_scheduler_type"),
    ({"train": {"epochs": 2, "dpo_beta": 0.2}}, "train.epochs: moved to train.trl.num_train_epochs\n.*train.dpo_beta: "
                                                 "moved to train.trl.beta"),
    ({"train": {"trl": {"output_dir": "x"}}}, "train.trl.output_dir: set by loraflow"),
    ({"train": {"attention": "flash"}}, "train.attention"),
])
def test_config_errors_name_the_key(change, message):
    raw = Params().model_dump()
    for section, values in change.items():
        raw[section].update(values)
    with pytest.raises(ConfigError, match=message):
        parse_params(raw, Path("params.yaml"))


def test_a_pretrained_base_is_referenced_by_hash_not_copied(tiny_base, tmp_path):
    from pipeline.base import build_base
    from pipeline.config import BaseModelConfig
    from pipeline.hashing import file_sha256
    from pipeline.modeling import BaseMissing, base_weights_sha256, load_base, resolve_base

    out = build_base(BaseModelConfig(model=str(tiny_base), out_dir=str(tmp_path / "base")), tmp_path / "none.json",
                     progress=lambda s: None)
    assert sorted(p.name for p in out.iterdir()) == ["base.json", "loraflow-base.json"]  # no weights copied
    ref = json.loads((out / "base.json").read_text())
    assert ref["path"] == str(tiny_base.resolve()) and ref["revision"] == ""
    assert ref["files"]["model.safetensors"] == file_sha256(tiny_base / "model.safetensors")
    assert resolve_base(out) == tiny_base.resolve()
    assert base_weights_sha256(out) == base_weights_sha256(tiny_base) == ref["files"]["model.safetensors"]
    model, tok = load_base(out)
    assert model.config.hidden_size == 64 and len(tok) > 100
    # Weights replaced in the referenced folder after the base stage hashed them: refused, not loaded.
    moved = tmp_path / "moved-model"
    shutil.copytree(tiny_base, moved)
    ref2 = build_base(BaseModelConfig(model=str(moved), out_dir=str(tmp_path / "b3")), tmp_path / "none.json",
                      progress=lambda s: None)
    with open(moved / "model.safetensors", "ab") as fh:
        fh.write(b"\0" * 8)
    with pytest.raises(BaseMissing, match="model.safetensors changed since the base stage"):
        resolve_base(ref2)
    # Pickled weights run code when loaded: refused, with the reason.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_base / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="safetensors only"):
        build_base(BaseModelConfig(model=str(pickled), out_dir=str(tmp_path / "b2")), tmp_path / "none.json",
                   progress=lambda s: None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_trains_on_cuda(tiny_base, data, tmp_path):
    m = train(tiny_cfg(tmp_path, adapter="qlora"), tiny_base, data / "train/clean.jsonl", None)
    assert m["device"] == "cuda" and m["steps"] == 12


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_base_keeps_unquantized_weights_in_bf16(tiny_base):
    # peft's prepare_model_for_kbit_training would upcast these to float32 (more memory than bf16 LoRA).
    from pipeline.train.trainer import load_base

    model, _ = load_base(tiny_base, quantize_4bit=True)
    float_params = {n: p.dtype for n, p in model.named_parameters() if p.is_floating_point()}
    assert float_params and set(float_params.values()) == {torch.bfloat16}
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())



DDP_SCRIPT = """
import json, os, sys
from pathlib import Path
from pipeline.config import TrainConfig
from pipeline.train.trainer import train
cfg = TrainConfig(**json.loads(sys.argv[1]))
m = train(cfg, Path(sys.argv[2]), Path(sys.argv[3]))
print("RANK", os.environ.get("RANK"), json.dumps({"wrote": bool(m), "tokens": m.get("tokens_seen"),
                                                  "steps": m.get("steps")}), flush=True)
"""


@pytest.mark.timeout(600)
def test_two_process_ddp_on_cpu_gloo_trains_once_and_only_rank0_writes(tiny_base, data, tmp_path):
    """The multi-GPU code path on 2 CPU processes (torchrun, gloo): both ranks train, rank 0 alone writes
    the adapter and metrics, and the step sees both ranks' tokens."""
    train_file = data / "train/clean.jsonl"
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)

    def launch(nproc: int, out: Path) -> dict:
        cfg = tiny_cfg(out, trl=dict(max_steps=4, save_steps=100)).model_dump()
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={nproc}", str(script), json.dumps(cfg), str(tiny_base),
                               str(train_file)], capture_output=True, text=True, timeout=500, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return {line.split()[1]: json.loads(line.split(" ", 2)[2]) for line in proc.stdout.splitlines()
                if line.startswith("RANK ")}

    two = launch(2, tmp_path / "two")
    assert two["0"]["wrote"] and not two["1"]["wrote"], two
    metrics = json.loads((tmp_path / "two/adapter/train_metrics.json").read_text())
    assert metrics["steps"] == 4 and (tmp_path / "two/adapter/adapter_model.safetensors").is_file()
    one = launch(1, tmp_path / "one")
    assert 1.6 < two["0"]["tokens"] / one["0"]["tokens"] < 2.4, (two, one)  # each rank took its own batches
    # The 2-process adapter loads and scores like any other.
    res = evaluate_model(tiny_base, tmp_path / "two/adapter", data / "eval/clean.jsonl",
                         EvaluateConfig(max_examples=8), TaskConfig(kind="text", max_new_tokens=8))
    assert res["n"] == 8


@pytest.mark.timeout(900)
def test_multi_node_and_fsdp_launch_paths_on_cpu_gloo(tiny_base, data, tmp_path):
    """train.distributed's launch path as on a cluster, on CPU processes (gloo): two torchrun agents as two
    nodes meeting at a c10d rendezvous, and FSDP (train.trl.fsdp) on two processes. Each time every rank
    trains, rank 0 alone writes, and the adapter is whole (every LoRA tensor unsharded) and scores."""
    import socket

    from pipeline.config import DistributedConfig
    from pipeline.train.launch import torchrun_args

    train_file = data / "train/clean.jsonl"
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def command(d: DistributedConfig, out: Path, **trl) -> list[str]:
        cfg = tiny_cfg(out, trl=dict(max_steps=4, save_steps=100, **trl)).model_dump()
        return [*torchrun_args(d), str(script), json.dumps(cfg), str(tiny_base), str(train_file)]

    def ranks(stdout: str) -> dict:
        return {line.split()[1]: json.loads(line.split(" ", 2)[2]) for line in stdout.splitlines()
                if line.startswith("RANK ")}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = DistributedConfig(nnodes=2, nproc_per_node=1, rdzv_endpoint=f"127.0.0.1:{port}", rdzv_id="t")
    cmd = command(nodes, tmp_path / "nodes")  # the same command on every node
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
              for _ in range(2)]
    outs = [a.communicate(timeout=600) for a in agents]
    assert all(a.returncode == 0 for a in agents), [o[1][-2000:] for o in outs]
    seen = {**ranks(outs[0][0]), **ranks(outs[1][0])}
    assert set(seen) == {"0", "1"} and [seen[r]["wrote"] for r in ("0", "1")] == [True, False], seen
    reference = load_file(tmp_path / "nodes/adapter/adapter_model.safetensors")

    fsdp = command(DistributedConfig(nproc_per_node=2), tmp_path / "fsdp", fsdp=True,
                   fsdp_config={"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "use_orig_params": True})
    proc = subprocess.run(fsdp, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = ranks(proc.stdout)
    assert [seen[r]["wrote"] for r in ("0", "1")] == [True, False] and seen["0"]["steps"] == 4, seen
    sharded = load_file(tmp_path / "fsdp/adapter/adapter_model.safetensors")
    assert {k: v.shape for k, v in sharded.items()} == {k: v.shape for k, v in reference.items()}
    res = evaluate_model(tiny_base, tmp_path / "fsdp/adapter", data / "eval/clean.jsonl",
                         EvaluateConfig(max_examples=4), TaskConfig(kind="text", max_new_tokens=4))
    assert res["n"] == 4


def test_the_train_stage_relaunches_itself_by_configuration(monkeypatch):
    from pydantic import ValidationError

    from pipeline.config import DistributedConfig, PrivacyConfig, TrainConfig
    from pipeline.train.launch import relaunch

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert relaunch(DistributedConfig(), ["train"]) is None
    cmd = relaunch(DistributedConfig(nproc_per_node=8, nnodes=2, rdzv_endpoint="node0:29500"), ["train"])
    assert cmd[-3:] == ["-m", "pipeline", "train"] and "--nnodes=2" in cmd and "--nproc-per-node=8" in cmd
    assert "--rdzv-endpoint=node0:29500" in cmd and "--rdzv-backend=c10d" in cmd
    monkeypatch.setenv("LOCAL_RANK", "0")  # already a torchrun worker: train here
    assert relaunch(DistributedConfig(nproc_per_node=8), ["train"]) is None
    with pytest.raises(ValidationError, match="rdzv_endpoint"):
        DistributedConfig(nnodes=2)
    with pytest.raises(ValidationError, match="train.distributed"):
        TrainConfig(privacy=PrivacyConfig(enabled=True, target_epsilon=8), distributed={"nproc_per_node": 2})
    assert not TrainConfig(trl={"fsdp": True}).fused  # the fused LoRA node does not address FSDP's flat params


def test_trl_options_pass_through_and_unknown_ones_are_named(tmp_path):
    from pipeline.device import detect
    from pipeline.train.trl_args import check_trl_keys, training_args

    # Options loraflow never mapped reach TRL's own config object unchanged; loraflow's defaults fill the rest.
    cfg = tiny_cfg(tmp_path, trl=dict(neftune_noise_alpha=5.0, max_grad_norm=0.5, optim="adamw_torch",
                                      weight_decay=0.01))
    args = training_args(cfg, tmp_path / "ck", has_eval=True, dev=detect())
    assert type(args).__name__ == "SFTConfig"
    assert (args.neftune_noise_alpha, args.max_grad_norm, args.optim, args.weight_decay) == (5.0, 0.5, "adamw_torch", 0.01)
    assert (args.max_steps, args.per_device_train_batch_size, args.save_steps) == (12, 8, 4)  # the user's
    assert (args.lr_scheduler_type, args.learning_rate) == ("cosine", 2e-3)  # loraflow's defaults
    assert args.activation_checkpointing is False  # loraflow's default over TRL's (on)
    assert args.output_dir == str(tmp_path / "ck") and args.eval_strategy == "steps" and args.eval_steps == 4
    dpo = training_args(tiny_cfg(tmp_path, method="dpo", trl=dict(beta=0.3)), tmp_path / "ck", False, detect())
    assert type(dpo).__name__ == "DPOConfig" and dpo.beta == 0.3 and dpo.eval_strategy == "no"
    with pytest.raises(ConfigError, match=r"train.trl.lerning_rate: not a field of TRL .*SFTConfig "
                                          r"\(did you mean learning_rate\?\)"):
        check_trl_keys(tiny_cfg(tmp_path, trl=dict(lerning_rate=1e-4)))
    with pytest.raises(ConfigError, match="train.trl.beta: not a field of TRL .*SFTConfig"):
        check_trl_keys(tiny_cfg(tmp_path, trl=dict(beta=0.1)))  # DPO's option with method sft
    with pytest.raises(ConfigError, match="train.trl: TRL rejected the settings"):
        training_args(tiny_cfg(tmp_path, trl=dict(lr_scheduler_type="no-such-schedule")), tmp_path / "ck", False,
                      detect())


def test_every_assistant_turn_of_a_conversation_is_a_training_row(tmp_path):
    from pipeline.train.trainer import load_turn_rows

    convo = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"},
             {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
             {"role": "assistant", "content": "a2"}]
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"messages": convo}) + "\n")
    rows = load_turn_rows(f)
    assert [r["completion"][0]["content"] for r in rows] == ["a1", "a2"]
    assert rows[0]["prompt"] == convo[:2] and rows[1]["prompt"] == convo[:4]


def test_completions_that_do_not_fit_max_length_are_counted_and_stop_the_run_above_the_share(tiny_base):
    from transformers import AutoTokenizer

    from pipeline.train.trainer import check_fit, fit_to_length

    tok = AutoTokenizer.from_pretrained(tiny_base)
    short = {"prompt": [{"role": "user", "content": "late parcel"}], "completion": [{"role": "assistant", "content": "ok"}]}
    long_answer = {**short, "completion": [{"role": "assistant", "content": "billing " * 80}]}
    long_prompt = {**short, "prompt": [{"role": "user", "content": "refund " * 200}]}
    kept, fit = fit_to_length([short] * 8 + [long_answer, long_prompt], tok, 64)
    assert fit == {"rows": 10, "truncated": 1, "dropped": 1} and long_prompt not in kept and len(kept) == 9
    with pytest.raises(ValueError, match=r"train.trl.max_length=64: 2 of 10 .*train.max_truncated_share"):
        check_fit(fit, TrainConfig(trl={"max_length": 64}, max_truncated_share=0.1))
    check_fit(fit, TrainConfig(trl={"max_length": 64}, max_truncated_share=0.25))  # counted, not fatal
