"""Shared by the CPU benches that run each configuration in its own process (peak memory is then the
run's own): start ``script --one <spec>``, read its ``RESULT <json>`` line, and store the result file."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path


def run_isolated(script: str, project: Path, spec: dict) -> dict:
    out = subprocess.run([sys.executable, script, "--project", str(project), "--one", json.dumps(spec)],
                         capture_output=True, text=True, cwd=project)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"run {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[7:])


def spread(values) -> dict:
    values = list(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def save(out: str, result: dict) -> None:
    print(json.dumps(result["summary"], indent=1))
    if out:
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
