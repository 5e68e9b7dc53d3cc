"""Typed wrapper and fake kernels of ``torch.ops.bigmodel.attention`` and its backward.

Blocked (flash-style) scaled dot-product attention with an online softmax; backward recomputes the
probabilities from the saved logsumexp (contract: csrc/attention/attention.h). The autograd formula
is C++ (csrc/attention/attention_autograd.cpp): a Python one ran on every call, and at decoding
shapes it cost more than the attention itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["attention"]


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    key_lengths: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention in the layout of ``F.scaled_dot_product_attention``.

    Args:
        query: ``(B, Hq, Lq, d)``.
        key: ``(B, Hkv, Lk, d)`` with ``Hq % Hkv == 0`` (query head ``h`` reads kv head
            ``h // (Hq // Hkv)``).
        value: ``(B, Hkv, Lk, dv)``.
        attn_mask: broadcastable to ``(B, Hq, Lq, Lk)``; bool (True = attend) or a float tensor of
            query's dtype added to the scores. No gradient flows to it.
        key_lengths: ``(B,)`` int32/int64 in ``[0, Lk]``: keys ``j >= key_lengths[b]`` are masked
            (and never read).
        is_causal: query ``i`` sees keys ``j <= i`` (top-left aligned).
        scale: score scale, default ``1 / sqrt(d)``.
        dropout_p: probability of zeroing each attention probability (kept ones scaled by
            ``1 / (1 - p)``). The mask is a hash of ``(seed, b, h, i, j)``, so backward regenerates it.
        seed: the dropout seed; default: drawn from torch's default generator when ``dropout_p > 0``.

    Returns:
        ``(out (B, Hq, Lq, dv), logsumexp (B, Hq, Lq))``; logsumexp is float32 (float64 for float64
        inputs) and ``-inf`` for rows with no valid key, whose output is zero.
    """
    if attn_mask is not None and attn_mask.requires_grad:
        raise ValueError("bigmodel.attention: no gradient flows to attn_mask; pass attn_mask.detach()")
    if seed is None:
        seed = int(torch.randint(0, 2**31, ())) if dropout_p > 0.0 else 0
    return torch.ops.bigmodel.attention(
        query, key, value, attn_mask, key_lengths, is_causal, scale, dropout_p, seed
    )


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("bigmodel::attention")
def _attention_fake(
    query, key, value, attn_mask=None, key_lengths=None, is_causal=False, scale=None, dropout_p=0.0, seed=0
):
    torch._check(query.dim() == 4, lambda: f"bigmodel.attention: query must be 4-D, got {query.shape}")
    torch._check(value.dim() == 4, lambda: f"bigmodel.attention: value must be 4-D, got {value.shape}")
    B, Hq, Lq, _ = query.shape
    out = query.new_empty((B, Hq, Lq, value.shape[-1]))
    lse = query.new_empty((B, Hq, Lq), dtype=_lse_dtype(query.dtype))
    return out, lse


@torch.library.register_fake("bigmodel::attention_backward")
def _attention_backward_fake(
    grad_out, query, key, value, out, logsumexp, attn_mask, key_lengths, is_causal, scale, dropout_p, seed
):
    return (
        torch.empty_like(query, memory_format=torch.contiguous_format),
        torch.empty_like(key, memory_format=torch.contiguous_format),
        torch.empty_like(value, memory_format=torch.contiguous_format),
    )
