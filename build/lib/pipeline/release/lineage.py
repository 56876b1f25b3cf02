"""Lineage facts that tie a model version to its inputs: DVC-recorded hashes, git commit, params."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import yaml


def dvc_lock_hashes(lock_file: Path = Path("dvc.lock")) -> dict[str, str]:
    """``{"<stage>:<path>": md5}`` for every dep and out that DVC recorded."""
    if not lock_file.is_file():
        return {}
    lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    out: dict[str, str] = {}
    for stage, body in (lock.get("stages") or {}).items():
        for section in ("deps", "outs"):
            for entry in body.get(section) or []:
                if "md5" in entry:
                    out[f"{stage}:{entry['path']}"] = entry["md5"]
    return out


# Files a run itself rewrites: DVC records the stage hashes of this very run in dvc.lock (they are in the
# version's dvc.* tags), so its change says nothing about the code and must not mark the commit dirty.
RUN_OUTPUTS = ("dvc.lock",)


def git_commit(cwd: Path = Path(".")) -> tuple[str, list[str]]:
    """HEAD's commit, with ``-dirty`` when tracked files other than the run's own outputs differ, and the
    differing files; ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                 *(f":(exclude){f}" for f in RUN_OUTPUTS)], cwd=cwd,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", []
    dirty = [line[3:] for line in status.splitlines() if line.strip()]
    return sha + ("-dirty" if dirty else ""), dirty


def params_sha256(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
