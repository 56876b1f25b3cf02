"""The base model stage: build the embedded tiny Llama, or resolve a Hugging Face id / local path.

No model hub is reachable on the reference machines, so ``base.model: builtin:tiny-llama`` builds a
small, randomly initialised Llama-architecture model and a byte-level BPE tokenizer trained on the
project's own raw text, deterministically from ``base.seed``. LoRA on such a model learns the demo
triage task; it is a stand-in for a real base, with the same code path from then on. Any other value of
``base.model`` is loaded with ``from_pretrained`` (hub id or directory) and saved to ``base.out_dir`` so
training, evaluation and vLLM all read one local copy.

    python -m pipeline base
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.config import BaseModelConfig

# A minimal chat format both transformers and vLLM render from tokenizer_config.json.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def _corpus(files: Iterable[Path]) -> Iterator[str]:
    """Text of every parseable record; malformed lines are skipped here (sanitize reports them)."""
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                for m in rec.get("messages", []) if isinstance(rec, dict) else []:
                    if isinstance(m, dict) and isinstance(m.get("content"), str):
                        yield m["content"]


def build_tokenizer(cfg: BaseModelConfig, corpus_files: list[Path]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Sorted input keeps the merges independent of file order.
    tok.train_from_iterator(sorted(_corpus(corpus_files)), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|end|>",
        bos_token=None,
        unk_token=None,
        model_max_length=cfg.max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_builtin(cfg: BaseModelConfig, corpus_files: list[Path], out_dir: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(cfg, corpus_files)
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def fetch_pretrained(model_id: str, out_dir: Path) -> Path:
    """Load a hub id or local path with from_pretrained and keep one local copy for every consumer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_id)
    model = AutoModelForCausalLM.from_pretrained(model_id, torch_dtype="auto")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_base(cfg: BaseModelConfig, corpus_files: list[Path]) -> Path:
    out = Path(cfg.out_dir)
    if cfg.is_builtin:
        if cfg.model != "builtin:tiny-llama":
            raise ValueError(f"base.model: unknown builtin {cfg.model!r} (known: builtin:tiny-llama)")
        return build_builtin(cfg, corpus_files, out)
    return fetch_pretrained(cfg.model, out)
