"""Word tokenizer for English review text.

Lower-cases, drops HTML tags (IMDB reviews carry ``<br />``), and splits on everything that is not a
letter, keeping ``!`` and ``?`` as tokens and splitting English clitics off their word the way the
Penn Treebank does: ``don't -> do n't``, ``can't -> can n't``, ``it's -> it 's``, ``we'll -> we 'll``.
Other apostrophes inside a word are kept (``o'brien``); digits and other punctuation are dropped.
"""

from __future__ import annotations

import re

__all__ = ["tokenize"]

_TAG = re.compile(r"<[^>]*>")
# A run of letters, optionally continued by apostrophe + letters; or a kept punctuation mark.
_TOKEN = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*|[!?]")
_CLITICS = ("'s", "'re", "'ve", "'ll", "'d", "'m")
# Stems whose spelling changes before n't.
_NT_STEMS = {"ca": "can", "wo": "will", "sha": "shall"}


def _split_clitic(word: str) -> list[str]:
    if word.endswith("n't") and len(word) > 3:
        stem = word[:-3]
        return [_NT_STEMS.get(stem, stem), "n't"]
    for clitic in _CLITICS:
        if word.endswith(clitic) and len(word) > len(clitic):
            return [word[: -len(clitic)], clitic]
    return [word]


def tokenize(text: str) -> list[str]:
    """Tokens of ``text``, for example ``"It isn't GOOD!"`` gives ``["it", "is", "n't", "good", "!"]``."""
    text = _TAG.sub(" ", text.lower()).replace("\u2019", "'").replace("\u2018", "'")
    tokens: list[str] = []
    for word in _TOKEN.findall(text):
        tokens.extend(_split_clitic(word) if "'" in word else (word,))
    return tokens
