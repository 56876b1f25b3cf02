"""The base model as every stage sees it (train, evaluate, the champion re-score, serving, lineage).

``base.out_dir`` holds either the embedded base's files or ``base.json``, a reference to a pretrained
model's folder with the sha256 of each file (pipeline/base/pretrained.py). ``resolve_base`` gives the folder
to load from; the identity digests come from the reference, so gigabytes of weights are hashed once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.device import detect
from pipeline.hashing import dir_sha256, file_sha256

BASE_REF = "base.json"


class BaseMissing(FileNotFoundError):
    """No base model in ``base.out_dir`` (the base stage has not run) or its referenced files are gone."""


def _reference(base_dir: Path) -> dict | None:
    path = Path(base_dir) / BASE_REF
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def base_present(base_dir: Path) -> bool:
    return (Path(base_dir) / BASE_REF).is_file() or (Path(base_dir) / "config.json").is_file()


def resolve_base(base_dir: Path) -> Path:
    """The folder the base model is loaded from."""
    base_dir = Path(base_dir)
    ref = _reference(base_dir)
    if ref is None:
        if not (base_dir / "config.json").is_file():
            raise BaseMissing(f"{base_dir}: no base model here; run the base stage first (python -m pipeline base)")
        return base_dir
    folder = Path(ref["path"])
    if not (folder / "config.json").is_file():
        raise BaseMissing(f"{base_dir / BASE_REF}: {ref['model']} was resolved to {folder}, which is not on this "
                          "machine; run the base stage here (python -m pipeline base)")
    # DVC does not watch a model folder outside the project: a cheap size check catches weights replaced
    # since the base stage hashed them (lineage would name the old ones).
    changed = [n for n, size in ref.get("sizes", {}).items()
               if not (folder / n).is_file() or (folder / n).stat().st_size != size]
    if changed:
        raise BaseMissing(f"{folder}: {', '.join(changed[:5])} changed since the base stage recorded it; run it "
                          "again (dvc repro --force base) so lineage names the weights in use")
    return folder


def weights_digest(weights: dict[str, str]) -> str:
    """One digest for a model's weights from each safetensors file's sha256: the file's own digest when
    there is one file (so the embedded base's identity is its file hash), else a digest of the sorted list."""
    if len(weights) == 1:
        return next(iter(weights.values()))
    return hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(weights.items())).encode()).hexdigest()


def base_weights_sha256(base_dir: Path) -> str:
    """The identity of a base model's weights. Versions carry it (``base_weights_sha256``) so serving can
    tell which base an adapter needs."""
    if (read_digest(base_dir) or {}).get("weights_sha256") == Path(base_dir).name:
        return Path(base_dir).name  # a store folder, named by the digest it was published with (read-only)
    ref = _reference(Path(base_dir))
    if ref is not None:
        return ref["weights_sha256"]
    weights = sorted(Path(base_dir).glob("*.safetensors"))
    return weights_digest({w.name: file_sha256(w) for w in weights}) if weights else dir_sha256(base_dir)


def base_config_sha256(base_dir: Path) -> str:
    ref = _reference(Path(base_dir))
    return ref["config_sha256"] if ref is not None else file_sha256(Path(base_dir) / "config.json")


def load_base(base_dir: Path, quantize_4bit: bool = False, attn_implementation: str = "sdpa", fsdp: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = resolve_base(base_dir)
    dev = detect()
    dtype = torch.bfloat16 if dev.bf16 else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    kwargs: dict = {"dtype": dtype}
    if quantize_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise RuntimeError("train.adapter: qlora needs bitsandbytes (pip install 'loraflow[gpu]')") from None
        from transformers import BitsAndBytesConfig

        # FSDP flattens every parameter of a wrapped module into one tensor of one dtype: the 4-bit weights
        # are stored as that dtype (QLoRA + FSDP), and FSDP places the shards itself.
        storage = {"bnb_4bit_quant_storage": dtype} if fsdp else {}
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, **storage)
        if dev.is_cuda and not fsdp:
            # A 4-bit model is quantized where it is loaded and cannot be moved afterwards: under torchrun
            # each rank loads its copy straight onto its own GPU.
            import os

            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    kwargs["attn_implementation"] = attn_implementation
    # No peft.prepare_model_for_kbit_training for QLoRA: it upcasts every non-quantized weight (norms and
    # the tied embedding/LM head) to float32, which made 4-bit Llama-3.2-1B use more memory than bf16 LoRA
    # (docs/benchmarks.md); bf16 norms are what bf16 LoRA trains with anyway, and peft freezes the base.
    return AutoModelForCausalLM.from_pretrained(base_dir, **kwargs), tokenizer


# --- the base store: immutable, addressed by content ---------------------------------------------------
# ``base.out_dir`` is the base stage's DVC output: rebuilt in place when the training data changes. Serving
# and the champion re-score need the base each version was trained on, which may be an older one, so the
# stage also publishes every base it builds to ``<store>/<weights sha256>/`` (written once, never changed).
# What may be removed from the store: ``prune_bases`` (a base no registered version refers to).
BASE_DIGEST = "loraflow-base.json"  # beside the weights: {"weights_sha256", "config_sha256", "model"}


def read_digest(folder: Path) -> dict | None:
    """The identity file beside a base's weights (None: the folder has none)."""
    path = Path(folder) / BASE_DIGEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def publish_base(base_dir: Path, store: Path, beside: bool = True) -> Path:
    """Copy the base in ``base_dir`` into ``store/<weights sha256>`` unless it is there (its identity file
    beside the weights), point ``store/current`` at it, and return the store folder. A copy lands under a
    temporary name and is renamed, so a reader never sees half a base; its files are read-only; an existing
    one is never replaced. ``beside``: also write the identity file into ``base_dir`` (the base stage does;
    anyone else must not touch that DVC output)."""
    import os
    import shutil
    import stat
    import uuid

    base_dir, store = Path(base_dir), Path(store)
    digest = {"weights_sha256": base_weights_sha256(base_dir), "config_sha256": base_config_sha256(base_dir),
              "model": (_reference(base_dir) or {}).get("model", "builtin")}
    text = json.dumps(digest, indent=2) + "\n"
    if beside:
        (base_dir / BASE_DIGEST).write_text(text, encoding="utf-8")
    target = store / digest["weights_sha256"]
    store.mkdir(parents=True, exist_ok=True)
    if not (read_digest(target) or {}).get("weights_sha256") == digest["weights_sha256"]:
        tmp = store / f".tmp-{uuid.uuid4().hex}"
        shutil.copytree(base_dir, tmp)
        (tmp / BASE_DIGEST).write_text(text, encoding="utf-8")
        for f in tmp.rglob("*"):
            if f.is_file():
                f.chmod(f.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        try:
            os.rename(tmp, target)
        except OSError:  # published meanwhile by another run of the stage: theirs stands (never replaced)
            _remove(tmp)
    point(store, "current", target.name)
    return target


def point(store: Path, link: str, sha: str) -> None:
    """Point ``store/link`` at the base ``sha`` (``current``: the base built last; ``serving``: the base the
    champion needs, what an operator-run vLLM starts on). Swapped atomically."""
    import os
    import uuid

    tmp = Path(store) / f".{link}-{uuid.uuid4().hex}"
    tmp.symlink_to(sha)
    os.replace(tmp, Path(store) / link)


def _remove(folder: Path) -> None:
    import shutil
    import stat

    for f in folder.rglob("*"):
        if f.is_file():
            f.chmod(f.stat().st_mode | stat.S_IWUSR)
    shutil.rmtree(folder, ignore_errors=True)


def base_dir_for(base_dir: Path, store: Path, weights_sha: str) -> Path:
    """Where the base with weights ``weights_sha`` is on this machine: its store folder, else ``base_dir``
    when that holds it (a base built before the store existed). ``BaseMissing`` when neither does: that is
    "not now" for serving (it defers), never a verdict on the version."""
    target = Path(store) / weights_sha
    if (read_digest(target) or {}).get("weights_sha256") == weights_sha and base_present(target):
        return target
    if base_present(base_dir) and base_weights_sha256(base_dir) == weights_sha:
        return Path(base_dir)
    raise BaseMissing(f"base {weights_sha[:12]} is not on this machine (not in {store}, and {base_dir} holds "
                      "another base); run the base stage on the data that version was trained on to rebuild it")


def prune_bases(store: Path, keep: set[str], min_age_s: float = 86400.0, now: float | None = None) -> list[Path]:
    """Remove store folders whose sha is not in ``keep`` (the bases registered versions still refer to:
    ``registry.bases_in_use``) or named by a link (``current``, ``serving``), and that are older than
    ``min_age_s`` (a base just built may not be registered yet); also leftovers of an interrupted copy.
    Returns what was removed."""
    import time

    now = time.time() if now is None else now
    store = Path(store)
    linked = {p.resolve().name for p in store.iterdir() if p.is_symlink()} if store.is_dir() else set()
    removed = []
    for folder in sorted(store.iterdir()) if store.is_dir() else []:
        if folder.is_symlink() or now - folder.stat().st_mtime < min_age_s:
            continue
        if folder.name.startswith(".tmp-") or not (folder.name.startswith(".") or folder.name in keep | linked):
            _remove(folder)
            removed.append(folder)
    return removed
