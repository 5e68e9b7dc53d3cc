"""Pure-PyTorch versions of bigmodel's ops: the tests' oracle and the readable spec.

Everything here is written step by step with plain torch ops, for clarity rather than speed, and is
differentiable through ordinary autograd. Low-precision inputs (bfloat16, float16) are computed in
float32 and rounded at the end, as the fused kernels do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "attention_reference",
    "attention_weights_reference",
    "dropout_keep",
    "lstm_cell_reference",
    "lstm_layer_reference",
    "lstm_reference",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lstm_cell_reference(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    w_hr: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step for a batch: ``x (B, I), h (B, P), c (B, H) -> (h' (B, P), c' (B, H))``.

    Gate order i, f, g, o as in ``nn.LSTM``; with ``w_hr (P, H)`` the new hidden state is projected.
    Computes in the dtype it is given.
    """
    gates = x @ w_ih.T + h @ w_hh.T
    if b_ih is not None:
        gates = gates + b_ih + b_hh
    i, f, g, o = gates.chunk(4, dim=1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    if w_hr is not None:
        h_new = h_new @ w_hr.T
    return h_new, c_new


def _reverse_within_lengths(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverses each sequence of ``x (T, B, F)`` within its valid prefix; padding stays in place."""
    T = x.shape[0]
    t = torch.arange(T, device=x.device).unsqueeze(1)  # (T, 1)
    n = lengths.to(x.device).unsqueeze(0)  # (1, B)
    src = torch.where(t < n, n - 1 - t, t)  # (T, B): step read at position t
    return x.gather(0, src.unsqueeze(2).expand_as(x))


def lstm_layer_reference(
    input: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    w_hr: Tensor | None = None,
    lengths: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The semantics of ``bigmodel.ops.lstm.lstm_layer``, one step at a time.

    Args:
        input: ``(T, B, I)``.
        h0: ``(B, P)`` with ``P = proj_size`` if ``w_hr`` is given, else ``H``; c0: ``(B, H)``.
        w_ih: ``(4H, I)``; w_hh: ``(4H, P)``; b_ih, b_hh: ``(4H,)`` or None; w_hr: ``(P, H)`` or None.
        lengths: ``(B,)`` integers in ``[1, T]``, or None for all ``T``. Sequence ``b`` reads steps
            ``0 .. lengths[b] - 1``; later steps leave its state alone and give zero output.
        reverse: read each sequence backward, from step ``lengths[b] - 1`` down to ``0``.

    Returns:
        ``(output (T, B, P), h_n (B, P), c_n (B, H))`` in the dtype of ``input``; ``h_n``/``c_n`` are
        the state after each sequence's last valid step.
    """
    T, B, _ = input.shape
    ct = _compute_dtype(input.dtype)
    x = input.to(ct)
    h, c = h0.to(ct), c0.to(ct)
    weights = [None if w is None else w.to(ct) for w in (w_ih, w_hh, b_ih, b_hh, w_hr)]
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long)
    lengths = lengths.to(device=input.device, dtype=torch.long)
    if reverse:
        # Reading backward from the last valid step is reading the reversed valid prefix forward.
        x = _reverse_within_lengths(x, lengths)

    outputs = []
    for t in range(T):
        running = (t < lengths).unsqueeze(1)  # (B, 1): sequences that still read a step at t
        h_new, c_new = lstm_cell_reference(x[t], h, c, *weights)
        outputs.append(torch.where(running, h_new, torch.zeros_like(h_new)))
        h = torch.where(running, h_new, h)
        c = torch.where(running, c_new, c)
    output = torch.stack(outputs)
    if reverse:
        output = _reverse_within_lengths(output, lengths)
    dtype = input.dtype
    return output.to(dtype), h.to(dtype), c.to(dtype)


def lstm_reference(
    input: Tensor,
    hx: tuple[Tensor, Tensor] | None,
    weights: Sequence[Sequence[Tensor]],
    num_layers: int,
    bidirectional: bool,
    bias: bool = True,
    proj_size: int = 0,
    lengths: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """A multi-layer, optionally bidirectional LSTM built from :func:`lstm_layer_reference`.

    The time-major semantics of ``nn.LSTM`` without dropout, plus variable length.

    Args:
        input: ``(T, B, I)``.
        hx: ``(h_0 (L*D, B, P), c_0 (L*D, B, H))`` or None for zeros; ``D = 2`` if bidirectional.
        weights: per layer and direction (index ``layer * D + direction``), the parameters in
            ``nn.LSTM.all_weights`` order: ``w_ih, w_hh[, b_ih, b_hh][, w_hr]``.
        lengths: ``(B,)`` integers in ``[1, T]`` or None; output is zero past each sequence's end.

    Returns:
        ``(output (T, B, D*P), (h_n (L*D, B, P), c_n (L*D, B, H)))``.
    """
    num_directions = 2 if bidirectional else 1
    T, B, _ = input.shape
    if hx is None:
        H = weights[0][1].shape[0] // 4
        P = proj_size if proj_size > 0 else H
        h0 = input.new_zeros((num_layers * num_directions, B, P))
        c0 = input.new_zeros((num_layers * num_directions, B, H))
    else:
        h0, c0 = hx
    h_n, c_n = [], []
    x = input
    for layer in range(num_layers):
        outputs = []
        for direction in range(num_directions):
            k = layer * num_directions + direction
            w = list(weights[k])
            w_ih, w_hh = w[0], w[1]
            b_ih, b_hh = (w[2], w[3]) if bias else (None, None)
            w_hr = w[-1] if proj_size > 0 else None
            out, h, c = lstm_layer_reference(
                x, h0[k], c0[k], w_ih, w_hh, b_ih, b_hh, w_hr, lengths=lengths, reverse=direction == 1
            )
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        x = torch.cat(outputs, dim=2)
    return x, (torch.stack(h_n), torch.stack(c_n))


def attention_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    key_lengths: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """The semantics of ``bigmodel.ops.attention.attention``, with the full score matrix.

    Args:
        query: ``(B, Hq, Lq, d)``; key: ``(B, Hkv, Lk, d)``; value: ``(B, Hkv, Lk, dv)``; ``Hq % Hkv == 0``
            and query head ``h`` reads kv head ``h // (Hq // Hkv)``.
        attn_mask: broadcastable to ``(B, Hq, Lq, Lk)``: bool (True = attend) or added to the scores.
        key_lengths: ``(B,)`` integers in ``[0, Lk]``; keys ``j >= key_lengths[b]`` are masked.
        is_causal: query ``i`` sees keys ``j <= i``.
        scale: default ``1 / sqrt(d)``.
        dropout_p, seed: each probability is kept where ``dropout_keep(seed, ...)`` says so and scaled
            by ``1 / (1 - dropout_p)``, the rest zeroed; logsumexp does not see dropout.

    Returns:
        ``(out (B, Hq, Lq, dv), logsumexp (B, Hq, Lq))``. A row with no valid key gets output 0 and
        logsumexp ``-inf``. Computed in float32 (float64 for float64) and ``out`` rounded to query's dtype.
    """
    ct = _compute_dtype(query.dtype)
    probs, lse = _probabilities(query, key, attn_mask, key_lengths, is_causal, scale, dropout_p, seed)
    v = value.to(ct).repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    return (probs @ v).to(query.dtype), lse


def attention_weights_reference(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    key_lengths: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    average: bool = False,
) -> Tensor:
    """The semantics of ``bigmodel.ops.attention.attention_weights``: the probabilities
    ``attention_reference`` multiplies the values by (dropout included), ``(B, Hq, Lq, Lk)`` in
    query's dtype, or their mean over the query heads, ``(B, Lq, Lk)``. Arguments as there."""
    probs, _ = _probabilities(query, key, attn_mask, key_lengths, is_causal, scale, dropout_p, seed)
    return (probs.mean(dim=1) if average else probs).to(query.dtype)


def _probabilities(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None,
    key_lengths: Tensor | None,
    is_causal: bool,
    scale: float | None,
    dropout_p: float,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """(probabilities after dropout (B, Hq, Lq, Lk), logsumexp (B, Hq, Lq)) in the compute dtype."""
    ct = _compute_dtype(query.dtype)
    q, k = query.to(ct), key.to(ct)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, Hq, Lq, Lk)
    Lq, Lk = scores.shape[-2:]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(ct)
    valid = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if is_causal:
        valid = valid.tril()
    valid = valid.expand(q.shape[0], 1, Lq, Lk)
    if key_lengths is not None:
        in_length = torch.arange(Lk, device=q.device) < key_lengths.to(q.device).view(-1, 1, 1, 1)
        valid = valid & in_length
    scores = scores.masked_fill(~valid, float("-inf"))
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    # Empty rows take a finite stand-in so that no NaN reaches autograd; their probabilities are 0.
    lse = torch.logsumexp(scores.masked_fill(empty, 0.0), dim=-1, keepdim=True)
    probs = torch.exp(scores - lse).masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        keep = dropout_keep(seed, *probs.shape, dropout_p, device=probs.device)
        probs = probs * keep / (1.0 - dropout_p)
    return probs, lse.masked_fill(empty, float("-inf")).squeeze(-1)


_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """32-bit integer finalizer on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def dropout_keep(
    seed: int, B: int, H: int, Lq: int, Lk: int, p: float, device: torch.device | str = "cpu"
) -> Tensor:
    """Attention dropout's keep mask ``(B, H, Lq, Lk)`` (bool): a hash of ``(seed, b, h, i, j)``.

    Score ``(b, h, i, j)`` is kept iff ``hash >= p * 2**32``, so with probability ``1 - p``; the
    kernel computes the same bits (csrc/attention/attention_cpu.cpp, ``Dropout``).
    """

    def idx(n: int, dim: int) -> Tensor:
        shape = [1, 1, 1, 1]
        shape[dim] = n
        return torch.arange(n, dtype=torch.int64, device=device).view(shape)

    x = _mix32(torch.tensor(((seed & _MASK32) + 0x9E3779B9) & _MASK32, dtype=torch.int64, device=device))
    for n, dim in ((B, 0), (H, 1), (Lq, 2), (Lk, 3)):
        x = _mix32(x ^ idx(n, dim))
    return x >= min(int(p * 2**32), _MASK32)
