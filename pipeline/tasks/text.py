"""Free-text answers: normalised exact match, ROUGE-L (``rouge-score``) and chrF (``sacrebleu``).

ROUGE-L uses the project's Unicode tokens, so answers in any script are compared word by word
(character by character in scripts written without spaces); rouge-score's own tokenizer keeps only a-z0-9.
"""

from __future__ import annotations

import re
import unicodedata

from pipeline.tasks import register
from pipeline.tasks.base import Score, Task
from pipeline.text import tokens

_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Case-folded, NFKC, whitespace collapsed, surrounding punctuation dropped."""
    text = _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
    return text.strip(" .,;:!?\"'`")


class _Tokens:
    def tokenize(self, text: str) -> list[str]:
        return tokens(text)


@register
class TextTask(Task):
    kind = "text"
    metrics_per_example = ("valid", "exact_match", "rouge_l", "chrf")
    primary = "exact_match"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        from rouge_score import rouge_scorer
        from sacrebleu.metrics import CHRF

        self._rouge = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokens())
        self._chrf = CHRF()

    def check_reference(self, answer: str) -> str | None:
        return None if answer.strip() else "empty answer"

    def answer_key(self, answer: str) -> str:
        return normalise(answer)

    def score(self, prediction: str, reference: str, prompt: str = "") -> Score:
        if not prediction.strip():
            return self.zero("empty answer")
        rouge = self._rouge.score(reference, prediction)["rougeL"].fmeasure
        chrf = self._chrf.sentence_score(prediction, [reference]).score / 100.0
        return Score({"valid": 1.0, "exact_match": float(normalise(prediction) == normalise(reference)),
                      "rouge_l": round(rouge, 6), "chrf": round(chrf, 6)}, "", prediction)
