"""An optional model-based recogniser: a Hugging Face token-classification model (a BERT-style NER or PII
model, by id with network access or from a local folder) through ``from_pretrained``, safetensors only and
never with remote code. It reads the normalised view after the rules ran and adds entities they missed;
the rules stay on because they are exact where a model is only likely.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import RecogniserConfig

log = logging.getLogger(__name__)


class ModelRecogniser:
    kind = "NAME"

    def __init__(self, cfg: RecogniserConfig) -> None:
        import torch
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model, revision=cfg.revision)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"sanitize.pii.recogniser.model: {cfg.model} has no fast tokenizer (character "
                             "offsets are needed to redact what it finds)")
        self.model = AutoModelForTokenClassification.from_pretrained(cfg.model, revision=cfg.revision,
                                                                     use_safetensors=True).eval()
        self.labels = self.model.config.id2label
        self.torch = torch
        self.last_kinds: dict[tuple[int, int], str] = {}
        mapped = {self._entity(lbl) for lbl in self.labels.values()} & set(cfg.labels)
        if not mapped:
            raise ValueError(f"sanitize.pii.recogniser.labels: none of the model's labels "
                             f"{sorted(set(self.labels.values()))[:12]} is mapped to a placeholder kind")

    @staticmethod
    def _entity(label: str) -> str:
        return label[2:] if label[:2] in ("B-", "I-", "E-", "S-", "L-", "U-") else label

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Entity spans of ``text``; their kinds are left in ``last_kinds`` (start, end) -> kind."""
        self.last_kinds = {}
        if not text.strip():
            return []
        enc = self.tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=self.cfg.max_length,
                             stride=min(32, self.cfg.max_length // 4), return_overflowing_tokens=True,
                             padding=True, return_tensors="pt")
        offsets = enc.pop("offset_mapping").tolist()
        enc.pop("overflow_to_sample_mapping", None)
        with self.torch.inference_mode():
            probs = self.model(**enc).logits.softmax(-1)
        best = probs.max(-1)
        spans: dict[tuple[int, int], str] = {}
        for window in range(len(offsets)):
            cur: list = []  # [start, end, kind]
            for (s, e), p, idx in zip(offsets[window], best.values[window].tolist(), best.indices[window].tolist()):
                if s == e:  # special or padding token
                    continue
                label = self.labels[idx]
                kind = self.cfg.labels.get(self._entity(label)) if p >= self.cfg.threshold else None
                inside = label.startswith("I-") or (cur and s == cur[1])  # continuation of a word or entity
                if kind and cur and cur[2] == kind and (inside or text[cur[1]:s].strip() == ""):
                    cur[1] = e
                    continue
                if cur:
                    spans[(cur[0], cur[1])] = cur[2]
                cur = [s, e, kind] if kind else []
            if cur:
                spans[(cur[0], cur[1])] = cur[2]
        merged: list[list] = []
        for (s, e), kind in sorted(spans.items()):
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e, kind])
        self.last_kinds = {(s, e): k for s, e, k in merged}
        return [(s, e) for s, e, _ in merged]


def load_recogniser(cfg: RecogniserConfig) -> ModelRecogniser:
    try:
        return ModelRecogniser(cfg)
    except OSError as err:
        raise ValueError(f"sanitize.pii.recogniser.model: cannot load {cfg.model!r}: {err}") from None
