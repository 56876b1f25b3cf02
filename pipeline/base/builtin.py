"""The embedded default base: a tiny Llama and its tokenizer, built and pretrained here from the project's
own sanitized text, because no model hub is reachable on the reference machines (``base.model:
builtin:tiny-llama``; settings under ``base.builtin``). Real models never come here (pipeline/base/pretrained.py).

It trains a byte-level BPE tokenizer on the sanitized text, writes a working copy circuit into the initial
weights (pipeline/base/circuits.py), then *pretrains* the model (causal LM, full parameters) on the training
prompts, the training answers as separate documents, the generic chat data and a synthetic copy curriculum
(pipeline/base/curriculum.py), deterministically from ``base.builtin.seed``, and scales its output layer
(``output_scale``). A random base leaves LoRA to learn the task on top of noise: right at argmax but
unconfident, and unable to copy values from the prompt (docs/benchmarks.md). ``pretrain.json`` next to the
weights records the config, the input hashes, the loss curve and the loss reached.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from pipeline.config import BuiltinBaseConfig
from pipeline.base.circuits import seed_copy_circuit
from pipeline.hashing import file_sha256
from pipeline.io import write_json

# A minimal chat format both transformers and vLLM render from tokenizer_config.json.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def _corpus(files: Iterable[Path]) -> Iterator[str]:
    """Text of every message of ``files`` (the tokenizer's training text)."""
    for conversation in _conversations(files):
        for m in conversation:
            yield m["content"]


def build_tokenizer(cfg: BuiltinBaseConfig, corpus_files: list[Path]):
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


def _conversations(files: Iterable[Path], prompts_only: bool = False) -> list[list[dict[str, str]]]:
    """The chat records of ``files``; ``prompts_only`` drops the final answer of each. Malformed lines
    and messages are skipped here (sanitize is where they are reported)."""
    out = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                messages = rec.get("messages") if isinstance(rec, dict) else None
                if isinstance(messages, list):
                    messages = [m for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)]
                    out.append(messages[:-1] if prompts_only else messages)
    return out


def _common_words(conversations: list[list[dict[str, str]]], n: int = 2000) -> list[str]:
    counts = Counter(w for c in conversations for m in c for w in re.findall(r"[^\W_]+", m["content"]))
    return [w for w, _ in counts.most_common(n)]


class PretrainDocs:
    """What pretraining reads: whole conversations (task prompts, generic chat) and detached answers,
    drawn at ``answer_share`` of the corpus documents."""

    def __init__(self, conversations: list[list[dict[str, str]]], answers: list[str], answer_share: float = 0.3):
        self.conversations, self.answers, self.answer_share = conversations, answers, answer_share


def _answers(files: Iterable[Path]) -> list[str]:
    """The final answers of ``files``' records, each a document of its own."""
    return [c[-1]["content"] for c in _conversations(files) if c and c[-1].get("role") == "assistant"]


def _repeat_block(rng: random.Random, low: int, high: int) -> list[int]:
    """Random token ids, then the same ids again: the plainest signal for an induction (copy) circuit."""
    span = [rng.randrange(low, high) for _ in range(rng.randint(4, 24))]
    return span + span


def token_stream(tokenizer, docs: PretrainDocs, cfg: BuiltinBaseConfig) -> list[int]:
    """Enough tokens for the pretraining budget, drawn in a seeded order from four kinds of document:
    the corpus's conversations (prompts, generic chat), the task's answers detached from their prompts
    (so the output vocabulary is trained without the prompt -> answer mapping), synthetic copy/lookup
    conversations, and raw repeated random token spans, at ``curriculum_share`` for the last two."""
    from pipeline.base.curriculum import conversation

    rng = random.Random(cfg.seed)
    words = _common_words(docs.conversations)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    low = len(SPECIAL_TOKENS)
    needed = cfg.pretrain_steps * cfg.pretrain_batch_size * cfg.pretrain_seq_len + 1
    ids: list[int] = []
    while len(ids) < needed:
        texts, raw = [], []
        for _ in range(512):
            r = rng.random()
            if r < cfg.curriculum_share * 0.25 or not (docs.conversations or docs.answers):
                raw.append(_repeat_block(rng, low, len(tokenizer)))
            elif r < cfg.curriculum_share:
                texts.append(tokenizer.apply_chat_template(conversation(rng, words), tokenize=False))
            elif docs.answers and (not docs.conversations or rng.random() < docs.answer_share):
                texts.append("<|assistant|>\n" + rng.choice(docs.answers) + "<|end|>\n")
            else:
                texts.append(tokenizer.apply_chat_template(rng.choice(docs.conversations), tokenize=False))
        for enc in tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []:
            ids.extend(enc)
        for block in raw:
            ids.extend(block + [end])
    return ids[:needed]


def pretrain(model, tokenizer, docs: PretrainDocs, cfg: BuiltinBaseConfig,
             progress: Callable[[str], None] = print) -> dict:
    """Causal-LM pretraining on packed blocks of the token stream; returns the loss curve and totals."""
    import torch

    stream = torch.tensor(token_stream(tokenizer, docs, cfg), dtype=torch.long)
    L, B = cfg.pretrain_seq_len, cfg.pretrain_batch_size
    blocks = stream[: (len(stream) - 1) // L * L].view(-1, L)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(cfg.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, cfg.pretrain_steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to a tenth
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.pretrain_steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    curve, recent = [], []
    started = time.perf_counter()
    device = next(model.parameters()).device
    for step in range(cfg.pretrain_steps):
        batch = blocks[order[step * B:(step + 1) * B]].to(device)
        # Where the model is on a GPU, bf16 autocast over float32 master weights.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        recent.append(loss.item())
        if (step + 1) % 10 == 0 or step + 1 == cfg.pretrain_steps:
            curve.append({"step": step + 1, "loss": round(sum(recent) / len(recent), 4)})
            recent = []
        if (step + 1) % 50 == 0 or step + 1 == cfg.pretrain_steps:
            spent = time.perf_counter() - started
            progress(f"base: pretraining step {step + 1}/{cfg.pretrain_steps}, loss {curve[-1]['loss']:.3f}, "
                     f"{spent:.0f}s, about {spent / (step + 1) * (cfg.pretrain_steps - step - 1):.0f}s left")
    model.eval()
    seconds = time.perf_counter() - started
    return {"steps": cfg.pretrain_steps, "tokens": cfg.pretrain_steps * B * L, "seconds": round(seconds, 1),
            "tokens_per_s": round(cfg.pretrain_steps * B * L / max(seconds, 1e-9)),
            "final_loss": curve[-1]["loss"] if curve else None, "loss_curve": curve}


def build_builtin(cfg: BuiltinBaseConfig, corpus_files: list[Path], out_dir: Path,
                  progress: Callable[[str], None] = print, chat_files: list[Path] = ()) -> Path:
    """Tokenizer and model from ``corpus_files`` (the task's training records: pretraining sees their
    prompts and, as separate documents, their answers, never the two paired, or the base would already do
    the task and leave nothing for the adapter and the gate to measure) and ``chat_files`` (generic
    conversations, answers included)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(cfg, [*corpus_files, *chat_files])
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    circuit = seed_copy_circuit(model, cfg.seed) if cfg.copy_circuit else None
    report = {"steps": 0, "note": "no pretraining (base.pretrain_steps: 0)"}
    if cfg.pretrain_steps:
        docs = PretrainDocs(_conversations(corpus_files, prompts_only=True) + _conversations(chat_files),
                            _answers(corpus_files))
        report = pretrain(model, tokenizer, docs, cfg, progress)
    if cfg.output_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(cfg.output_scale)
    report["copy_circuit"] = circuit
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    write_json(out_dir / "pretrain.json", {"config": cfg.model_dump(), "inputs": {
        str(f): file_sha256(f) for f in [*corpus_files, *chat_files]}, **report})
    return out_dir
