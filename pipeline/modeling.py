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
