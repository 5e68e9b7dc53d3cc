"""Typed wrapper and fake kernels of ``torch.ops.bigmodel.attention`` and its backward.

Blocked (flash-style) scaled dot-product attention with an online softmax; backward recomputes the
probabilities from the saved logsumexp (contract: csrc/attention/attention.h). The autograd formula
is C++ (csrc/attention/attention_autograd.cpp): a Python one ran on every call, and at decoding
shapes it cost more than the attention itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["attention", "attention_weights"]


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
            query's dtype added to the scores; a float mask that requires grad gets its gradient (CPU).
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
    if seed is None:
        seed = int(torch.randint(0, 2**31, ())) if dropout_p > 0.0 else 0
    return torch.ops.bigmodel.attention(
        query, key, value, attn_mask, key_lengths, is_causal, scale, dropout_p, seed
    )


def attention_weights(
    query: Tensor,
    key: Tensor,
    logsumexp: Tensor,
    attn_mask: Tensor | None = None,
    key_lengths: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    average: bool = False,
) -> Tensor:
    """The probabilities an ``attention`` call multiplied the values by (what
    ``nn.MultiheadAttention`` returns with ``need_weights=True``), from that call's ``logsumexp``.

    Args:
        query, key, attn_mask, key_lengths, is_causal, scale, dropout_p, seed: the ``attention``
            call's (the same ``seed`` gives the same dropout).
        logsumexp: that call's second output, ``(B, Hq, Lq)``.
        average: return the mean over the query heads.

    Returns:
        ``(B, Hq, Lq, Lk)`` in query's dtype (``(B, Lq, Lk)`` with ``average``): ``exp(s - logsumexp)``
        for the valid keys, 0 for masked keys and for rows without any, times the dropout factor.
        Differentiable in query, key and a float ``attn_mask`` (the softmax's gradient; ``logsumexp``
        counts as the function of them that it is). On CPU; one [B, Lq, Lk] block of scores at a
        time is recomputed, so the [B, Hq, Lq, Lk] tensor exists only without ``average``.
    """
    return torch.ops.bigmodel.attention_weights(
        query, key, logsumexp.detach(), attn_mask, key_lengths, is_causal, scale, dropout_p, seed, average
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
    grad_out,
    query,
    key,
    value,
    out,
    logsumexp,
    attn_mask,
    key_lengths,
    is_causal,
    scale,
    dropout_p,
    seed,
    mask_grad=False,
):
    return (
        torch.empty_like(query, memory_format=torch.contiguous_format),
        torch.empty_like(key, memory_format=torch.contiguous_format),
        torch.empty_like(value, memory_format=torch.contiguous_format),
        attn_mask.new_empty(attn_mask.shape) if mask_grad else query.new_empty((0,)),
    )


@torch.library.register_fake("bigmodel::attention_weights")
def _attention_weights_fake(
    query,
    key,
    logsumexp,
    attn_mask=None,
    key_lengths=None,
    is_causal=False,
    scale=None,
    dropout_p=0.0,
    seed=0,
    average=False,
):
    torch._check(
        query.dim() == 4, lambda: f"bigmodel.attention_weights: query must be 4-D, got {query.shape}"
    )
    torch._check(key.dim() == 4, lambda: f"bigmodel.attention_weights: key must be 4-D, got {key.shape}")
    B, Hq, Lq, _ = query.shape
    Lk = key.shape[2]
    return query.new_empty((B, Lq, Lk) if average else (B, Hq, Lq, Lk))


def _weights_setup_context(ctx, inputs, output) -> None:
    query, key, logsumexp, attn_mask, key_lengths, is_causal, scale, dropout_p, seed, average = inputs
    ctx.save_for_backward(query, key, logsumexp, attn_mask, key_lengths)
    ctx.args = (is_causal, scale, dropout_p, seed, average)


def _weights_backward(ctx, grad: Tensor):
    """W = P * Z (Z the dropout factors), P = softmax(S), S = scale q k^T (+ mask): with G = dL/dW
    (per head), dS = P * (Z G - rowsum(P Z G)) = W G - P rowsum(W G); dq = scale dS k, dk = scale
    dS^T q (summed over a GQA group); a float mask's gradient is dS summed to its shape. Runs only
    when the weights reach the loss; the [B, Hq, Lq, Lk] terms are materialized, as the weights
    themselves are without averaging. Differentiable again (the weights op inside has this formula;
    the rest are torch ops)."""
    query, key, logsumexp, attn_mask, key_lengths = ctx.saved_tensors
    is_causal, scale, dropout_p, seed, average = ctx.args
    # needs_input_grad can end before trailing arguments left at their defaults (3 entries without a mask).
    mask_grad = attn_mask is not None and ctx.needs_input_grad[3]
    if grad is None or not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or mask_grad):
        return (None,) * 10
    ct = torch.float64 if query.dtype == torch.float64 else torch.float32
    Hq, group = query.shape[1], query.shape[1] // key.shape[1]
    g = grad.to(ct)
    g = (g / Hq).unsqueeze(1) if average else g
    q, k = query.to(ct), key.to(ct)
    lse = logsumexp.to(ct)

    def weights(p: float) -> Tensor:
        return torch.ops.bigmodel.attention_weights(
            q, k, lse, attn_mask, key_lengths, is_causal, scale, p, seed, False
        )

    probs = weights(0.0)
    wg = (weights(dropout_p) if dropout_p > 0.0 else probs) * g
    ds = wg - probs * wg.sum(dim=-1, keepdim=True)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    k_rep = k.repeat_interleave(group, dim=1) if group > 1 else k
    dq = (ds @ k_rep) * s if ctx.needs_input_grad[0] else None
    dk = None
    if ctx.needs_input_grad[1]:
        dk = (ds.transpose(-2, -1) @ q) * s
        if group > 1:
            dk = dk.unflatten(1, (key.shape[1], group)).sum(dim=2)
        dk = dk.to(key.dtype)
    dmask = ds.sum_to_size(attn_mask.shape).to(attn_mask.dtype) if mask_grad else None
    return (
        dq.to(query.dtype) if dq is not None else None,
        dk,
        None,
        dmask,
        None,
        None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "bigmodel::attention_weights", _weights_backward, setup_context=_weights_setup_context
)
