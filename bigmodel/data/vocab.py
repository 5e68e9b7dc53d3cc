"""Vocabulary: token <-> id, built from training text, with ``<pad> = 0`` and ``<unk> = 1``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["PAD", "UNK", "Vocab", "encode_texts"]

PAD = "<pad>"
UNK = "<unk>"


class Vocab:
    """A fixed token list; ids are positions in it. ``tokens[0] == PAD``, ``tokens[1] == UNK``."""

    pad_id = 0
    unk_id = 1

    def __init__(self, tokens: Sequence[str]) -> None:
        if list(tokens[:2]) != [PAD, UNK]:
            raise ValueError(f"Vocab: the first two tokens must be {PAD!r}, {UNK!r}, got {list(tokens[:2])}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("Vocab: tokens must be unique")
        self.tokens = list(tokens)
        self._ids = {token: i for i, token in enumerate(self.tokens)}

    @classmethod
    def build(
        cls, token_lists: Iterable[Sequence[str]], min_freq: int = 1, max_size: int | None = None
    ) -> Vocab:
        """The tokens seen at least ``min_freq`` times, most frequent first (ties alphabetically).

        ``max_size`` bounds the whole vocabulary, ``<pad>`` and ``<unk>`` included.
        """
        if min_freq < 1:
            raise ValueError(f"Vocab.build: min_freq must be >= 1, got {min_freq}")
        if max_size is not None and max_size < 2:
            raise ValueError(f"Vocab.build: max_size must be >= 2 (room for {PAD} and {UNK}), got {max_size}")
        counts = Counter(token for tokens in token_lists for token in tokens)
        counts.pop(PAD, None)
        counts.pop(UNK, None)
        kept = sorted((t for t, n in counts.items() if n >= min_freq), key=lambda t: (-counts[t], t))
        if max_size is not None:
            kept = kept[: max_size - 2]
        return cls([PAD, UNK, *kept])

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._ids

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Ids of ``tokens``; unknown tokens map to ``unk_id``."""
        return [self._ids.get(token, self.unk_id) for token in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.tokens[i] for i in ids]


def encode_texts(
    token_lists: Iterable[Sequence[str]], vocab: Vocab, max_len: int | None = None
) -> list[Tensor]:
    """One int64 tensor of ids per text, cut to its first ``max_len`` tokens.

    A text with no tokens becomes ``[unk_id]``: every sequence has length >= 1, as the LSTMs require.
    """
    if max_len is not None and max_len < 1:
        raise ValueError(f"encode_texts: max_len must be >= 1, got {max_len}")
    out = []
    for tokens in token_lists:
        ids = vocab.encode(tokens[:max_len] if max_len is not None else tokens) or [vocab.unk_id]
        out.append(torch.tensor(ids, dtype=torch.int64))
    return out
