"""Unicode-aware tokens, shared by deduplication (shingles) and text metrics (ROUGE-L).

Words are runs of letters and digits of any script. Scripts written without spaces between words (Han,
Hiragana, Katakana, Thai, Lao, Khmer, Myanmar, Tibetan) have no word boundaries a regex can see, so
each of their characters is a token of its own: word n-grams over these tokens are character n-grams there.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[^\W_]+")
# Scripts without spaces between words: CJK ideographs (with extensions), kana, Hangul is spaced so not here.
_UNSPACED = re.compile(
    "[\u0e00-\u0eff\u0f00-\u0fff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uf900-\ufaff\U00020000-\U0003134f]"
)


def tokens(text: str) -> list[str]:
    """Case-folded word tokens; characters of unspaced scripts are single tokens."""
    out: list[str] = []
    for word in _WORD.findall(text.casefold()):
        if word.isascii() or not _UNSPACED.search(word):
            out.append(word)
            continue
        run = ""
        for ch in word:  # split unspaced-script characters off, keep spaced-script runs whole
            if _UNSPACED.match(ch):
                if run:
                    out.append(run)
                    run = ""
                out.append(ch)
            else:
                run += ch
        if run:
            out.append(run)
    return out
