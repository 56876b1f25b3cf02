"""The base stage: the model every adapter is trained on and served with.

    python -m pipeline base_inputs && python -m pipeline base

``base.model`` is a Hugging Face id or a local folder (pipeline/base/pretrained.py: referenced by hash,
never copied), or ``builtin:tiny-llama``, the embedded default for machines without a model hub
(pipeline/base/builtin.py, circuits.py, curriculum.py: built and pretrained from the sanitized text).
Consumers open either through ``pipeline.modeling`` (``resolve_base``, ``load_base``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from pipeline.config import BaseModelConfig
from pipeline.hashing import file_sha256
from pipeline.io import read_json, write_json

BUILTINS = ("builtin:tiny-llama",)


def write_inputs(cfg: BaseModelConfig, corpus_files: list[Path], chat_files: list[Path], out: Path) -> dict:
    """The ``base_inputs`` stage: what the base is built from. The embedded base is trained on the
    sanitized text, so its inputs are those files' hashes; a pretrained base has none, so new training
    data leaves this file, and with it the base stage, unchanged."""
    summary: dict = {"model": cfg.model, "inputs": {}}
    if cfg.is_builtin:
        summary.update(corpus=[str(f) for f in corpus_files], chat=[str(f) for f in chat_files],
                       inputs={str(f): file_sha256(f) for f in [*corpus_files, *chat_files] if f.is_file()})
    write_json(out, summary)
    return summary


def build_base(cfg: BaseModelConfig, inputs_file: Path, progress: Callable[[str], None] = print) -> Path:
    """The base stage: build the embedded base from the files ``inputs_file`` lists (checking they are the
    ones hashed there), or reference a pretrained model."""
    out = Path(cfg.out_dir)
    # A fresh folder, as under DVC: a reference left by an earlier pretrained run must not shadow new weights.
    shutil.rmtree(out, ignore_errors=True)
    if not cfg.is_builtin:
        from pipeline.base.pretrained import reference_pretrained

        return _published(cfg, reference_pretrained(cfg, out, progress), progress)
    if cfg.model not in BUILTINS:
        raise ValueError(f"base.model: unknown builtin {cfg.model!r} (known: {', '.join(BUILTINS)})")
    from pipeline.base.builtin import build_builtin

    listed = read_json(inputs_file)
    stale = [f for f, digest in listed.get("inputs", {}).items() if not Path(f).is_file() or file_sha256(Path(f)) != digest]
    if stale or listed.get("model") != cfg.model:
        raise ValueError(f"{inputs_file} is out of date ({', '.join(stale) or 'base.model changed'}); run the "
                         "base_inputs stage first (dvc repro base does)")
    corpus = [Path(f) for f in listed["corpus"] if f in listed["inputs"]]
    chat = [Path(f) for f in listed["chat"] if f in listed["inputs"] and Path(f).stat().st_size]
    return _published(cfg, build_builtin(cfg.builtin, corpus, out, progress, chat_files=chat), progress)


def _published(cfg: BaseModelConfig, out: Path, progress: Callable[[str], None]) -> Path:
    """The built base, also in the immutable store (a version trained on it can be served after the next
    rebuild)."""
    from pipeline.modeling import publish_base

    stored = publish_base(out, Path(cfg.store_dir))
    progress(f"base: published as {stored}")
    return out
