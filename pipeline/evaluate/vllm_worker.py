"""Offline vLLM generation for the evaluate stage, run by vLLM's own interpreter (``serve.python``):

    <serve.python> pipeline/evaluate/vllm_worker.py REQUEST.json RESULT.json

It imports only the standard library and vLLM (vLLM's environment has no loraflow dependencies: its pins
conflict with Prefect's). The parent (vllm_engine.py) tokenizes with the same chat template as the
transformers path and decodes the returned token ids itself, so both engines see the same inputs and their
outputs go through the same decoding and stop-string cut. The request names the jobs (prompt token ids, and
the adapter or none); the result holds each job's generated token ids and time, and the paired speed
rounds the gate's speed guardrail compares.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _say(msg: str) -> None:
    print(f"vllm-eval: {msg}", file=sys.stderr, flush=True)


def main(request_path: str, result_path: str) -> None:
    req = json.loads(open(request_path, encoding="utf-8").read())
    started = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    adapters = req["adapters"]  # name -> path
    llm_args = dict(req["llm"])
    if adapters:
        llm_args.update(enable_lora=True, max_loras=max(1, len(adapters)))
    llm = LLM(model=req["model"], **llm_args)
    startup = time.perf_counter() - started
    _say(f"engine ready in {startup:.1f}s (vLLM {vllm.__version__})")
    loras = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())}
    params = SamplingParams(**req["sampling"])

    # Speed rounds: every answer runs to max_tokens (no end token, no stop string), as on the transformers
    # path, so both models' tokens/s are of the same work.
    full = SamplingParams(**{**req["sampling"], "stop": [], "stop_token_ids": [], "ignore_eos": True})

    def run(prompts: list[list[int]], adapter: str | None, sampling=params) -> tuple[list[list[int]], float]:
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False,
                            lora_request=loras[adapter] if adapter else None)
        return [list(o.outputs[0].token_ids) for o in outs], time.perf_counter() - t

    jobs = {}
    for job in req["jobs"]:
        ids, seconds = run(job["prompts"], job["adapter"])
        jobs[job["name"]] = {"token_ids": ids, "seconds": round(seconds, 4), "tokens": sum(map(len, ids))}
        _say(f"{job['name']}: {len(ids)} prompts, {jobs[job['name']]['tokens']} tokens in {seconds:.2f}s")
    speed: dict[str, list[float]] = {}
    spec = req.get("speed")
    if spec:
        # Alternating order, like the transformers path: whatever else loads the machine slows both alike.
        for r in range(spec["rounds"]):
            order = spec["models"] if r % 2 == 0 else spec["models"][::-1]
            for name in order:
                ids, seconds = run(spec["prompts"], spec["adapter"].get(name), full)
                tot = speed.setdefault(name, [0, 0.0])
                tot[0] += sum(map(len, ids))
                tot[1] += seconds
    result = {"vllm": vllm.__version__, "startup_s": round(startup, 2), "jobs": jobs,
              "speed": {k: {"tokens": v[0], "seconds": round(v[1], 4)} for k, v in speed.items()}}
    tmp = result_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    os.replace(tmp, result_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
