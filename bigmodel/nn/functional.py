"""Functional forms of bigmodel's ops with the signatures of ``torch.nn.functional``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.attention import attention

__all__ = ["scaled_dot_product_attention"]


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    key_lengths: Tensor | None = None,
) -> Tensor:
    """``F.scaled_dot_product_attention`` on bigmodel's blocked attention kernel.

    Args:
        query: ``(..., Hq, Lq, d)``; key: ``(..., Hkv, Lk, d)``; value: ``(..., Hkv, Lk, dv)``, with
            the same leading dimensions (2-D and 3-D inputs work as in PyTorch). ``Hkv`` may divide
            ``Hq`` only with ``enable_gqa=True``.
        attn_mask: broadcastable to ``(..., Hq, Lq, Lk)``; bool (True = attend) or a float tensor
            added to the scores. A float mask that requires grad (a learned bias) gets its gradient:
            on the CPU from bigmodel's kernels, elsewhere through PyTorch's (this call then runs
            ``F.scaled_dot_product_attention``). Not combinable with ``is_causal``.
        dropout_p: dropout on the attention probabilities (applied whenever > 0, as in PyTorch). The
            mask comes from a seed drawn from torch's default generator, not PyTorch's own stream.
        is_causal: query ``i`` sees keys ``j <= i`` (top-left aligned).
        scale: default ``1 / sqrt(d)``.
        key_lengths: ``(B,)`` integer tensor (4-D inputs only): keys ``j >= key_lengths[b]`` are
            padding. Faster than the equivalent boolean ``attn_mask``: padded key blocks are skipped.

    Returns:
        ``(..., Hq, Lq, dv)``. Unlike PyTorch, a query row with no key to attend to gives zeros
        (and zero gradient) instead of NaN.
    """
    if is_causal and attn_mask is not None:
        raise ValueError(
            "bigmodel.scaled_dot_product_attention: pass either attn_mask or is_causal=True, not both"
        )
    if query.dim() < 2 or key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(
            "bigmodel.scaled_dot_product_attention: query, key and value must have the same number of "
            f"dimensions (at least 2), got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.dim() >= 3 and key.shape[-3] != query.shape[-3] and not enable_gqa:
        raise ValueError(
            f"bigmodel.scaled_dot_product_attention: query has {query.shape[-3]} heads but key has "
            f"{key.shape[-3]}; grouped-query attention needs enable_gqa=True"
        )
    if key_lengths is not None and query.dim() != 4:
        raise ValueError(
            "bigmodel.scaled_dot_product_attention: key_lengths needs 4-D inputs (B, H, L, d), "
            f"got query of shape {tuple(query.shape)}"
        )
    if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled() and not attn_mask.is_cpu:
        # bigmodel computes a learned mask's gradient on the CPU only: PyTorch's kernels serve it elsewhere.
        if key_lengths is not None:
            padded = torch.arange(key.shape[-2], device=key.device) >= key_lengths.view(-1, 1, 1, 1)
            attn_mask = attn_mask + torch.zeros(
                padded.shape, dtype=attn_mask.dtype, device=key.device
            ).masked_fill(padded, float("-inf"))
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa
        )
    if query.dim() != 4:
        q4, k4, v4 = (_as_4d(t) for t in (query, key, value))
        mask4 = None
        if attn_mask is not None:
            mask4 = _as_4d(attn_mask.expand(*query.shape[:-1], key.shape[-2]))
        out, _ = attention(q4, k4, v4, mask4, None, is_causal, scale, dropout_p)
        return out.reshape(*query.shape[:-1], value.shape[-1])
    out, _ = attention(query, key, value, attn_mask, key_lengths, is_causal, scale, dropout_p)
    return out


def _as_4d(t: Tensor) -> Tensor:
    """``(..., H, L, x)`` (or ``(L, x)``) as ``(B, H, L, x)``."""
    if t.dim() == 2:
        return t.reshape(1, 1, *t.shape)
    if t.dim() == 3:
        return t.unsqueeze(0)
    return t.reshape(-1, *t.shape[-3:])
