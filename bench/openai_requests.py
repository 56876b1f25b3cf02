"""Send held-out prompts to a loraflow gateway with the official `openai` client, as a user's application
would: the stable model name, the client key, no generation settings (the gateway fills in the task's).

    python bench/openai_requests.py --url http://127.0.0.1:8080/v1 --key KEY --model NAME --n 40

Prints each exchange's time, the share of answers equal to the reference (after JSON normalisation when
both parse), and a few answers. Standard library + openai only: it runs in vLLM's environment too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def _norm(text: str) -> str:
    try:
        return json.dumps(json.loads(text), sort_keys=True)
    except ValueError:
        return text.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--eval", default="data/clean/eval/clean.jsonl")
    ap.add_argument("--n", type=int, default=40)
    args = ap.parse_args()
    import openai

    client = openai.OpenAI(base_url=args.url, api_key=args.key, timeout=120, max_retries=2)
    rows = [json.loads(x) for x in Path(args.eval).read_text().splitlines()[:args.n]]
    same, times = 0, []
    for i, row in enumerate(rows):
        messages, expected = row["messages"][:-1], row["messages"][-1]["content"]
        t = time.perf_counter()
        resp = client.chat.completions.create(model=args.model, messages=messages)
        times.append(time.perf_counter() - t)
        answer = resp.choices[0].message.content or ""
        same += _norm(answer) == _norm(expected)
        if i < 3:
            print(f"answer {i}: {answer!r} (expected {expected!r}; model {resp.model})")
    print(f"openai client: {len(rows)} requests to {args.url} as {args.model!r}: {same}/{len(rows)} equal to the "
          f"reference ({same / max(len(rows), 1):.3f}); latency p50 {statistics.median(times) * 1000:.0f} ms, "
          f"max {max(times) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
