"""Text classifier: Embedding -> LSTM -> optional self-attention -> pooling -> Linear.

``backend="fused"`` runs ``bigmodel.nn.LSTM`` on the padded batch with ``lengths=``;
``backend="native"`` runs ``torch.nn.LSTM`` on a ``PackedSequence``. Both see the true lengths and
have the same parameter names, so a checkpoint from one loads into the other and their accuracies
compare like for like.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import bigmodel.nn

__all__ = ["BACKENDS", "POOLINGS", "TextClassifier", "self_attention"]

BACKENDS = ("fused", "native")
POOLINGS = ("last", "mean", "attention")


def self_attention(backend: str, embed_dim: int, num_heads: int) -> nn.Module:
    """The self-attention layer for ``backend``: ``(query, key, value, key_padding_mask=,
    need_weights=False) -> (output, None)`` on batch-first ``(B, T, E)`` tensors.

    ``fused`` takes ``bigmodel.nn.MultiheadAttention`` (a subclass with the same parameters, so
    checkpoints still move between backends; the right-padded mask becomes key lengths and padded
    key blocks are skipped), ``native`` takes ``torch.nn.MultiheadAttention``.
    """
    if backend == "fused":
        from ..nn import MultiheadAttention

        return MultiheadAttention(embed_dim, num_heads, batch_first=True)
    return nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)


class TextClassifier(nn.Module):
    r"""Sequence classifier over token ids.

    Args:
        vocab_size: number of token ids (the embedding rows).
        embed_dim: embedding size. Default 100.
        hidden_dim: LSTM hidden size per direction. Default 200.
        num_layers: stacked LSTM layers. Default 1.
        bidirectional: add a backward direction; features are then ``2 * hidden_dim``.
        num_classes: 2 gives one logit (``BCEWithLogits``); more gives one logit per class
            (cross-entropy).
        attention: add multi-head self-attention over the LSTM outputs (residual, padded steps
            masked out as keys).
        num_heads: attention heads; must divide the feature size.
        pooling: how the sequence becomes one vector:
            ``"last"`` the features where the LSTM's final states are read (forward direction at the
            last valid step, backward direction at step 0; without attention this is exactly
            ``h_n`` of the last layer), ``"mean"`` the mean over valid steps, ``"attention"`` a
            learned softmax weighting of the valid steps.
        dropout: dropout on the pooled vector and between LSTM layers. Default 0.
        backend: ``"fused"`` (``bigmodel.nn.LSTM``) or ``"native"`` (``torch.nn.LSTM``).
        padding_idx: the id of the pad token. Default 0.

    Forward: ``model(ids (B, T) int64, lengths (B,) int64) -> logits``, ``(B,)`` for two classes,
    else ``(B, num_classes)``; ``lengths`` in ``[1, T]`` (on the CPU or the ids' device).
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 100,
        hidden_dim: int = 200,
        num_layers: int = 1,
        bidirectional: bool = False,
        num_classes: int = 2,
        attention: bool = False,
        num_heads: int = 4,
        pooling: Literal["last", "mean", "attention"] = "last",
        dropout: float = 0.0,
        backend: Literal["fused", "native"] = "fused",
        padding_idx: int = 0,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"TextClassifier: backend must be one of {BACKENDS}, got {backend!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"TextClassifier: pooling must be one of {POOLINGS}, got {pooling!r}")
        if num_classes < 2:
            raise ValueError(f"TextClassifier: num_classes must be >= 2, got {num_classes}")
        features = hidden_dim * (2 if bidirectional else 1)
        if attention and features % num_heads:
            raise ValueError(
                f"TextClassifier: num_heads ({num_heads}) must divide the LSTM feature size ({features})"
            )
        self.backend = backend
        self.hidden_dim = hidden_dim
        self.bidirectional = bidirectional
        self.num_classes = num_classes
        self.pooling = pooling
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        lstm_class = bigmodel.nn.LSTM if backend == "fused" else nn.LSTM
        self.lstm = lstm_class(
            embed_dim,
            hidden_dim,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
            bidirectional=bidirectional,
        )
        self.attention = self_attention(backend, features, num_heads) if attention else None
        self.pool_score = nn.Linear(features, 1) if pooling == "attention" else None
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(features, 1 if num_classes == 2 else num_classes)

    def _run_lstm(
        self, ids: Tensor, lengths: Tensor, need_sequence: bool = True
    ) -> tuple[Tensor | None, Tensor]:
        """The LSTM's padded output ``(B, T, D * hidden_dim)`` (None unless ``need_sequence``) and
        its final hidden state ``h_n`` (the last valid step of each sequence)."""
        x = self.embedding(ids)
        if self.backend == "fused":
            out, (h_n, _) = self.lstm(x, lengths=lengths)
            return out, h_n
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, (h_n, _) = self.lstm(packed)
        if not need_sequence:
            return None, h_n
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        return out, h_n

    def encode(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """The sequence features ``(B, T, D * hidden_dim)``; zero at padded steps unless attention
        is on (then padded steps hold values that pooling ignores)."""
        T = ids.shape[1]
        out, _ = self._run_lstm(ids, lengths)
        assert out is not None
        if self.attention is not None:
            padding = _valid_mask(lengths.to(ids.device), T).logical_not()
            attended, _ = self.attention(out, out, out, key_padding_mask=padding, need_weights=False)
            out = out + attended
        return out

    def pool(self, seq: Tensor, lengths: Tensor) -> Tensor:
        """``(B, T, F) -> (B, F)`` by ``self.pooling``."""
        lengths = lengths.to(seq.device)
        if self.pooling == "last":
            rows = torch.arange(seq.shape[0], device=seq.device)
            forward = seq[rows, lengths - 1, : self.hidden_dim]
            if not self.bidirectional:
                return forward
            return torch.cat([forward, seq[:, 0, self.hidden_dim :]], dim=1)
        valid = _valid_mask(lengths, seq.shape[1])
        if self.pooling == "mean":
            summed = (seq * valid.unsqueeze(-1)).sum(dim=1)
            return summed / lengths.unsqueeze(1).to(seq.dtype)
        scores = self.pool_score(seq).squeeze(-1).masked_fill(~valid, float("-inf"))
        weights = torch.softmax(scores, dim=1)
        return torch.bmm(weights.unsqueeze(1), seq).squeeze(1)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        if self.pooling == "last" and self.attention is None:
            # Each direction's last valid state is the LSTM's own final state (h_n): the values
            # `pool` would gather from the sequence, without a (B, T, F) gradient to zero-fill and
            # scatter in backward.
            _, h_n = self._run_lstm(ids, lengths, need_sequence=False)
            pooled = torch.cat([h_n[-2], h_n[-1]], dim=1) if self.bidirectional else h_n[-1]
        else:
            pooled = self.pool(self.encode(ids, lengths), lengths)
        logits = self.classifier(self.dropout(pooled))
        return logits.squeeze(-1) if self.num_classes == 2 else logits

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean loss of ``logits`` (from ``forward``) against integer ``labels (B,)``."""
        if self.num_classes == 2:
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return F.cross_entropy(logits, labels)

    def predict(self, logits: Tensor) -> Tensor:
        """Class ids ``(B,)`` from ``logits``."""
        if self.num_classes == 2:
            return (logits > 0).long()
        return logits.argmax(dim=-1)


def _valid_mask(lengths: Tensor, T: int) -> Tensor:
    """``(B, T)`` bool, True at steps ``t < lengths[b]``."""
    return torch.arange(T, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
