"""A real base model (``base.model: <hub id or local folder>``), referenced where it is, never copied.

The base stage resolves the model once: a local folder as it is, a hub id through ``huggingface_hub``'s
cache at ``base.revision`` (the resolved commit is recorded). It writes only ``base.json`` to
``base.out_dir``: the id, the revision, the folder the files are read from and the sha256 of every file,
so DVC tracks a few hundred bytes instead of gigabytes of weights, and lineage still pins the exact
weights. Safetensors weights only (pickled ``.bin`` checkpoints run code when loaded); no remote code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.config import BaseModelConfig
from pipeline.hashing import file_sha256
from pipeline.io import write_json
from pipeline.modeling import BASE_REF, weights_digest

# What a causal LM needs from a hub repository: config, tokenizer, safetensors weights (and their index).
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def _snapshot(model_id: str, revision: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_id, revision=revision or None, allow_patterns=HUB_PATTERNS))


def locate(model: str, revision: str) -> tuple[Path, str]:
    """The local folder holding ``model`` at ``revision`` and the revision it is (a commit for a hub id)."""
    local = Path(model).expanduser()
    if local.is_dir():
        if revision:
            raise ValueError(f"base.revision: {revision!r} given, but base.model {model!r} is a local folder")
        return local.resolve(), ""
    folder = _snapshot(model, revision)
    return folder, folder.name  # the hub cache keeps each snapshot in snapshots/<commit>


def describe(folder: Path) -> dict[str, str]:
    """sha256 of every file the model is loaded from (config, tokenizer, weights)."""
    # Top level only: what from_pretrained reads (a folder may also hold checkpoints or adapters below it).
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not any(p.suffix == ".safetensors" for p in files):
        raise ValueError(f"{folder}: no *.safetensors weights (loraflow loads safetensors only; convert the "
                         "checkpoint first)")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json: not a transformers model folder")
    return {str(p.relative_to(folder)): file_sha256(p) for p in files}


def reference_pretrained(cfg: BaseModelConfig, out_dir: Path, progress: Callable[[str], None] = print) -> Path:
    """Resolve ``cfg.model`` and write ``out_dir/base.json`` (the reference every consumer follows)."""
    folder, revision = locate(cfg.model, cfg.revision)
    progress(f"base: {cfg.model}{'@' + revision if revision else ''} at {folder}: hashing its files")
    files = describe(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / BASE_REF, {
        "model": cfg.model, "revision": revision, "path": str(folder), "files": files,
        "sizes": {name: (folder / name).stat().st_size for name in files},
        "config_sha256": files["config.json"],
        "weights_sha256": weights_digest({k: v for k, v in files.items() if k.endswith(".safetensors")}),
    })
    return out_dir
