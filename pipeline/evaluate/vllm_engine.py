"""Evaluate's generation on vLLM's offline engine (``evaluate.engine``), in vLLM's own environment.

vLLM cannot share the pipeline's environment (its pins conflict with Prefect's), so the stage runs
``vllm_worker.py`` with ``serve.python``, once for every answer it needs (base and candidate, the eval
split and the forgetting prompts, the paired speed rounds): one engine start per stage. The prompts are
tokenized here with the chat template the transformers path uses, and the returned token ids are decoded
here the same way, so the per-example outputs of the two engines differ only where their arithmetic does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from pipeline.config import EvaluateConfig, ServeConfig, TaskConfig
from pipeline.evaluate.generation import cut_at_stop
from pipeline.io import tail
from pipeline.modeling import resolve_base
from pipeline.vllm_logs import START_ATTEMPTS, log_size, root_cause, transient_start

WORKER = Path(__file__).with_name("vllm_worker.py")
# vLLM's LoRA kernels are compiled for these ranks; an adapter's rank is rounded up to the next one.
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
RETRY_DELAY_S = 10.0  # before another start after a transient failure (pipeline.vllm_logs)


class EvaluateEngineError(RuntimeError):
    """The vLLM run failed or could not start; the message names the setting and the log."""


def _python(serve: ServeConfig) -> str | None:
    found = shutil.which(serve.python) if os.sep not in serve.python else serve.python
    return found if found and Path(found).exists() else None


def vllm_installed(serve: ServeConfig, timeout_s: float = 60.0) -> tuple[bool, str]:
    """Whether ``serve.python`` exists and can import vLLM (found, not imported: that takes seconds)."""
    python = _python(serve)
    if python is None:
        return False, f"serve.python {serve.python} not found"
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        rc = subprocess.run([python, "-c", probe], env=serve.process_env(), timeout=timeout_s,
                            capture_output=True).returncode
    except subprocess.TimeoutExpired:
        return False, f"serve.python {serve.python} did not answer within {timeout_s:.0f}s"
    return (rc == 0), ("" if rc == 0 else f"serve.python {serve.python} has no vllm package")


def resolve_engine(cfg: EvaluateConfig, serve: ServeConfig | None, cuda: bool,
                   answers: int | None = None) -> tuple[str, str]:
    """(engine, why): ``auto`` is vLLM on a CUDA machine whose serve.python has it, for at least
    ``evaluate.vllm_min_answers`` answers (``answers``: how many the stage generates), else transformers;
    an explicit ``vllm`` that cannot run is an error naming both settings."""
    if cfg.engine == "transformers":
        return "transformers", "evaluate.engine: transformers"
    if serve is None:
        if cfg.engine == "vllm":
            raise EvaluateEngineError("evaluate.engine: vllm needs the serve section (serve.python)")
        return "transformers", "no serve settings"
    if cfg.engine == "auto" and not cuda:
        return "transformers", "evaluate.engine: auto on a machine without CUDA"
    if cfg.engine == "auto" and answers is not None and answers < cfg.vllm_min_answers:
        return "transformers", (f"evaluate.engine: auto, {answers} answers < evaluate.vllm_min_answers "
                                f"({cfg.vllm_min_answers}): vLLM's start-up would cost more than it saves")
    ok, why = vllm_installed(serve)
    if ok:
        return "vllm", f"evaluate.engine: {cfg.engine}"
    if cfg.engine == "vllm":
        raise EvaluateEngineError(f"evaluate.engine: vllm, but {why} (make vllm-env, or set evaluate.engine)")
    return "transformers", f"evaluate.engine: auto, but {why}"


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The token ids the transformers path feeds ``generate`` for one chat prompt."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _lora_rank(adapter_dir: Path) -> int:
    r = int(json.loads((adapter_dir / "adapter_config.json").read_text()).get("r", 16))
    return next((k for k in LORA_RANKS if k >= r), r)


def _sampling(task: TaskConfig, tokenizer, base_dir: Path) -> dict:
    """Greedy, the task's length and stop strings, the tokenizer's end token: what ``generate`` does.
    A repetition penalty in the base's generation config applies to ``generate``, so it is passed too."""
    out: dict = {"temperature": 0.0, "max_tokens": task.max_new_tokens, "stop": list(task.stop),
                 "skip_special_tokens": True}
    if tokenizer.eos_token_id is not None:
        out["stop_token_ids"] = [tokenizer.eos_token_id]
    gen_cfg = base_dir / "generation_config.json"
    if gen_cfg.is_file():
        penalty = json.loads(gen_cfg.read_text()).get("repetition_penalty")
        if penalty and penalty != 1.0:
            out["repetition_penalty"] = penalty
    return out


class VLLMGenerator:
    """One offline vLLM run over named jobs: ``add`` the prompts of each (model, part), ``run`` once, then
    read each job's answers and the paired speed."""

    def __init__(self, base_dir: Path, adapters: dict[str, Path | None], tokenizer, task: TaskConfig,
                 cfg: EvaluateConfig, serve: ServeConfig, log_path: Path) -> None:
        self.base_dir, self.adapters, self.tokenizer, self.task = resolve_base(base_dir), adapters, tokenizer, task
        self.cfg, self.serve, self.log_path = cfg, serve, log_path
        self.jobs: list[dict] = []
        self.speed_spec: dict | None = None
        self.result: dict = {}

    def add(self, model: str, part: str, prompts: list[list[dict]]) -> None:
        self.jobs.append({"name": f"{model}/{part}", "adapter": model if self.adapters[model] else None,
                          "prompts": [prompt_ids(self.tokenizer, p) for p in prompts]})

    def paired_speed(self, prompts: list[list[dict]], rounds: int = 3) -> None:
        self.speed_spec = {"prompts": [prompt_ids(self.tokenizer, p) for p in prompts], "rounds": rounds,
                           "models": list(self.adapters),
                           "adapter": {m: (m if a else None) for m, a in self.adapters.items()}}

    def request(self) -> dict:
        served = {m: str(a.resolve()) for m, a in self.adapters.items() if a is not None}
        llm = {"dtype": self.serve.dtype, "max_model_len": self.serve.max_model_len, "seed": 0}
        if served:
            llm["max_lora_rank"] = max(_lora_rank(Path(p)) for p in served.values())
        llm.update(self.cfg.vllm)
        return {"model": str(self.base_dir.resolve()), "llm": llm, "adapters": served,
                "sampling": _sampling(self.task, self.tokenizer, self.base_dir), "jobs": self.jobs,
                "speed": self.speed_spec}

    def run(self, progress=print) -> dict:
        python = _python(self.serve)
        if python is None:
            raise EvaluateEngineError(f"serve.python {self.serve.python} not found (evaluate.engine: vllm)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="loraflow-vllm-eval-") as tmp:
            req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
            req.write_text(json.dumps(self.request()))
            n = sum(len(j["prompts"]) for j in self.jobs)
            progress(f"evaluate: vLLM offline engine ({python}), {len(self.jobs)} jobs, {n} prompts; "
                     f"log {self.log_path}")
            for attempt in range(1, START_ATTEMPTS + 1):
                offset = log_size(self.log_path)
                rc = self._attempt(python, req, res)
                if rc == 0 and res.is_file():
                    break
                cause = root_cause(self.log_path, offset)
                if attempt < START_ATTEMPTS and transient_start(cause):
                    progress(f"evaluate: vLLM's start was disturbed{cause}; attempt {attempt + 1} of "
                             f"{START_ATTEMPTS} in {RETRY_DELAY_S:.0f}s")
                    time.sleep(RETRY_DELAY_S)
                    continue
                raise EvaluateEngineError(f"the vLLM evaluation failed (exit {rc}){cause}; "
                                          f"last lines of {self.log_path}:\n{tail(self.log_path)}")
            self.result = json.loads(res.read_text())
        progress(f"evaluate: vLLM {self.result['vllm']} started in {self.result['startup_s']:.1f}s")
        return self.result

    def _attempt(self, python: str, req: Path, res: Path) -> int:
        """One worker run, its output appended to the log; its exit status."""
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen([python, str(WORKER), str(req), str(res)], stdout=log,
                                    stderr=subprocess.STDOUT, env=self.serve.process_env(), start_new_session=True)
            try:
                return proc.wait(timeout=self.cfg.vllm_timeout_s)
            except subprocess.TimeoutExpired:
                _kill(proc)
                raise EvaluateEngineError(
                    f"the vLLM evaluation ran past evaluate.vllm_timeout_s ({self.cfg.vllm_timeout_s:.0f}s) "
                    f"and was stopped; log: {self.log_path}") from None
            except BaseException:
                _kill(proc)
                raise

    def answers(self, model: str, part: str) -> tuple[list[str], dict]:
        """The decoded, stop-cut answers of one job, and its generation stats."""
        job = self.result["jobs"][f"{model}/{part}"]
        texts = [cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), self.task.stop)
                 for ids in job["token_ids"]]
        return texts, _stats(job["tokens"], job["seconds"])

    def speed(self) -> dict[str, dict]:
        rounds = self.speed_spec["rounds"] if self.speed_spec else 0
        n = len(self.speed_spec["prompts"]) if self.speed_spec else 0
        return {m: {**_stats(s["tokens"], s["seconds"]),
                    "method": f"paired on vLLM, {rounds} alternating rounds of {n} prompts, "
                              f"{self.task.max_new_tokens} tokens each"}
                for m, s in self.result.get("speed", {}).items()}


def _stats(tokens: int, seconds: float) -> dict:
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / max(seconds, 1e-9), 2)}


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()

