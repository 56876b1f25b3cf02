"""Evaluate on vLLM's offline engine (issue 26), against the real vLLM build of this machine: the same
answers, scores and files as the transformers path; the engine choice; a run past its deadline and a
failing run stop the stage with the setting and the log named."""

import json
import os
import time
from pathlib import Path

import psutil
import pytest
import torch

from pipeline.config import EvaluateConfig, ProbesConfig, ServeConfig, TaskConfig, TrainConfig
from pipeline.evaluate.scoring import evaluate_model, evaluate_stage
from pipeline.evaluate.vllm_engine import EvaluateEngineError, resolve_engine, vllm_installed

ROOT = Path(__file__).resolve().parents[1]
CPU_SERVE = ServeConfig(python=str(ROOT / ".venv-vllm/bin/python"),
                        env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1"})
GPU_SERVE = ServeConfig(python=os.environ.get("LORAFLOW_VLLM_PYTHON", "python3"), dtype="bfloat16", env={})
TASK = TaskConfig(kind="json", max_new_tokens=16)


@pytest.fixture(scope="module")
def adapter(tiny_base, clean_demo, tmp_path_factory) -> Path:
    from pipeline.train.trainer import train

    d = tmp_path_factory.mktemp("vllm-eval")
    cfg = TrainConfig(out_dir=str(d / "adapter"), checkpoint_dir=str(d / "ckpt"), lora_r=8, lora_alpha=16,
                      trl=dict(max_steps=30, per_device_train_batch_size=8, learning_rate=5e-3, save_steps=100))
    train(cfg, tiny_base, clean_demo / "train/clean.jsonl", clean_demo / "eval/clean.jsonl")
    return d / "adapter"


def _forgetting(tmp: Path, clean_demo: Path) -> Path:
    rows = [json.loads(x) for x in (clean_demo / "train/clean.jsonl").read_text().splitlines()[:12]]
    f = tmp / "forgetting.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def _same_answers(tiny_base, adapter, clean_demo, tmp_path, serve: ServeConfig, **vllm_args):
    """Run the whole stage once per engine and compare what they wrote."""
    out = {}
    for engine in ("transformers", "vllm"):
        cfg = EvaluateConfig(out_dir=str(tmp_path / engine), max_examples=40, batch_size=16, engine=engine,
                             vllm=vllm_args)
        evaluate_stage(tiny_base, adapter, clean_demo / "eval/clean.jsonl", cfg, TASK,
                       forgetting_file=_forgetting(tmp_path, clean_demo), probes=ProbesConfig(canaries=2),
                       serve=serve)
        out[engine] = json.loads((tmp_path / engine / "details.json").read_text())
    hf, vl = out["transformers"], out["vllm"]
    assert hf["generation"] == {"engine": "transformers"}
    assert vl["generation"]["engine"] == "vllm" and vl["generation"]["vllm"]
    agree = {}
    for model in ("base", "candidate"):
        a, b = hf[model], vl[model]
        assert a["n"] == b["n"] == 40
        same = [i for i, (x, y) in enumerate(zip(a["predictions"], b["predictions"])) if x == y]
        agree[model] = len(same) / a["n"]
        # Where the answers are equal, so is every per-example score (the scorer is shared).
        for m, values in a["per_example"].items():
            assert all(values[i] == b["per_example"][m][i] for i in same)
        # Probes score with transformers either way: identical.
        assert a["forgetting"] == b["forgetting"]
        assert [c["exposure"] for c in a["leak"]["canaries"]] == [c["exposure"] for c in b["leak"]["canaries"]]
        assert b["leak"]["answers_scanned"] == a["leak"]["answers_scanned"] == 40 + 12 + 2
        # Speed rounds run every answer to the task's length on both engines (the same work for both
        # models): 3 rounds of the eval prompts on vLLM, of one batch on transformers.
        assert b["speed"]["tokens"] == 3 * 40 * TASK.max_new_tokens and "vLLM" in b["speed"]["method"]
        assert a["speed"]["tokens"] == 3 * 16 * TASK.max_new_tokens
    return hf, vl, agree


def test_vllm_gives_the_transformers_answers_and_scores(tiny_base, adapter, clean_demo, tmp_path):
    hf, vl, agree = _same_answers(tiny_base, adapter, clean_demo, tmp_path, CPU_SERVE, gpu_memory_utilization=0.3)
    # Same inputs, same greedy decoding, float32 on both: the answers are the same, bar a near-tie.
    assert agree["base"] >= 0.95 and agree["candidate"] >= 0.95, agree
    for model in ("base", "candidate"):
        for m, v in hf[model]["summary"].items():
            assert vl[model]["summary"][m] == pytest.approx(v, abs=0.05), (model, m)
    # The adapter changes the answers on both engines (vLLM really applied the LoRA).
    assert vl["candidate"]["predictions"] != vl["base"]["predictions"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_vllm_on_gpu_gives_the_transformers_answers_and_scores(tiny_base, adapter, clean_demo, tmp_path):
    # bf16 on both engines with different kernels: near-ties can flip, so agreement is measured, not exact.
    hf, vl, agree = _same_answers(tiny_base, adapter, clean_demo, tmp_path, GPU_SERVE,
                                  gpu_memory_utilization=0.3)
    print("agreement", agree, {m: (hf[m]["summary"], vl[m]["summary"]) for m in ("base", "candidate")})
    assert agree["base"] >= 0.8 and agree["candidate"] >= 0.8, agree


def test_engine_choice():
    auto = EvaluateConfig()
    assert resolve_engine(auto, CPU_SERVE, cuda=False)[0] == "transformers"
    assert resolve_engine(EvaluateConfig(engine="transformers"), CPU_SERVE, cuda=True)[0] == "transformers"
    assert resolve_engine(auto, CPU_SERVE, cuda=True)[0] == "vllm"  # this machine's vLLM env has it
    # ... for enough answers only: below evaluate.vllm_min_answers its start-up costs more than it saves.
    assert resolve_engine(auto, CPU_SERVE, cuda=True, answers=5000)[0] == "vllm"
    engine, why = resolve_engine(auto, CPU_SERVE, cuda=True, answers=382)
    assert engine == "transformers" and "evaluate.vllm_min_answers" in why
    assert resolve_engine(EvaluateConfig(engine="vllm"), CPU_SERVE, cuda=True, answers=1)[0] == "vllm"
    assert resolve_engine(EvaluateConfig(engine="vllm"), CPU_SERVE, cuda=False)[0] == "vllm"
    missing = ServeConfig(python="/nonexistent/python")
    assert resolve_engine(auto, missing, cuda=True)[0] == "transformers"  # auto falls back, and says why
    assert "not found" in resolve_engine(auto, missing, cuda=True)[1]
    with pytest.raises(EvaluateEngineError, match="evaluate.engine: vllm.*serve.python /nonexistent"):
        resolve_engine(EvaluateConfig(engine="vllm"), missing, cuda=False)
    # An interpreter without vLLM (the pipeline's own) is "no vllm package", not a crash.
    ok, why = vllm_installed(ServeConfig(python=str(ROOT / ".venv/bin/python")))
    assert not ok and "no vllm package" in why


def _vllm_children_gone(before: set[int]) -> bool:
    return not [p for p in psutil.Process().children(recursive=True) if p.pid not in before]


def test_a_run_past_its_deadline_is_stopped_and_named(tiny_base, adapter, clean_demo, tmp_path):
    cfg = EvaluateConfig(out_dir=str(tmp_path), max_examples=4, engine="vllm", vllm_timeout_s=3,
                         vllm={"gpu_memory_utilization": 0.3})
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    t = time.monotonic()
    with pytest.raises(EvaluateEngineError, match=r"evaluate.vllm_timeout_s \(3s\).*vllm.log"):
        evaluate_model(tiny_base, adapter, clean_demo / "eval/clean.jsonl", cfg, TASK, serve=CPU_SERVE)
    assert time.monotonic() - t < 60
    assert _vllm_children_gone(before)  # the worker's whole process group was killed


def test_a_failing_run_names_its_log(tiny_base, adapter, clean_demo, tmp_path):
    cfg = EvaluateConfig(out_dir=str(tmp_path), max_examples=4, engine="vllm", vllm={"no_such_engine_arg": 1})
    # The root cause is named on the first line, not only somewhere in the log's tail.
    with pytest.raises(EvaluateEngineError, match=r"failed \(exit 1\): [^\n]*no_such_engine_arg"):
        evaluate_model(tiny_base, adapter, clean_demo / "eval/clean.jsonl", cfg, TASK, serve=CPU_SERVE)
    assert not (tmp_path / "metrics.json").exists()


def test_a_start_disturbed_by_another_process_is_tried_again(tiny_base, adapter, clean_demo, tmp_path, monkeypatch):
    """vLLM's own transient start-up failure (another process released GPU memory while it profiled),
    injected once in front of the real engine: the stage starts it again and its answers arrive."""
    from pipeline.evaluate import vllm_engine

    monkeypatch.setattr(vllm_engine, "RETRY_DELAY_S", 0.1)
    marker = tmp_path / "failed-once"
    wrapper = tmp_path / "python"
    wrapper.write_text(f"""#!/bin/sh
case "$1" in *vllm_worker.py)
  if [ ! -f {marker} ]; then touch {marker}
    echo "AssertionError: Error in memory profiling. Initial free memory 20.1 GiB, current free memory 22.3 GiB." >&2
    echo "RuntimeError: Engine core initialization failed. See root cause above." >&2; exit 1; fi;;
esac
exec {CPU_SERVE.python} "$@"
""")
    wrapper.chmod(0o755)
    serve = CPU_SERVE.model_copy(update={"python": str(wrapper)})
    cfg = EvaluateConfig(out_dir=str(tmp_path / "out"), max_examples=4, engine="vllm",
                         vllm={"gpu_memory_utilization": 0.3})
    res = evaluate_model(tiny_base, adapter, clean_demo / "eval/clean.jsonl", cfg, TASK, serve=serve)
    assert marker.exists() and res["n"] == 4 and res["speed"]["tokens"] > 0
    log = (tmp_path / "out" / "vllm.log").read_text()
    assert "Error in memory profiling" in log and "engine ready" in log


def test_under_auto_a_failed_vllm_run_falls_back_to_the_same_answers_from_transformers(tiny_base, adapter, clean_demo,
                                                                                       tmp_path):
    from transformers import AutoTokenizer

    from pipeline.evaluate.scoring import _started, _vllm

    cfg = EvaluateConfig(out_dir=str(tmp_path), engine="auto", vllm={"no_such_engine_arg": 1})
    gen = _vllm(tiny_base, {"model": adapter}, AutoTokenizer.from_pretrained(tiny_base), TASK, cfg, CPU_SERVE)
    gen.add("model", "eval", [[{"role": "user", "content": "hello"}]])
    why = _started(gen, cfg)
    assert "failed (exit 1)" in why and "no_such_engine_arg" in why  # said, with its cause
    with pytest.raises(EvaluateEngineError):  # an explicit engine: vllm stops the stage instead
        _started(gen, cfg.model_copy(update={"engine": "vllm"}))
