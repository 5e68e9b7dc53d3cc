"""``MultiheadAttention``: ``nn.MultiheadAttention`` with its attention on bigmodel's kernel."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..ops.attention import attention, attention_weights

__all__ = ["MultiheadAttention"]


@functools.cache
def _onednn_linear_op():
    """oneDNN's linear, ``torch.ops.mkldnn._linear_pointwise`` (the op inductor's CPU backend emits),
    if this torch build has it and it answers a probe call correctly; else None. Probed on first use,
    not at import: the probe's call initializes oneDNN (~11 ms here), which LSTM-only users would pay."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        out = op(torch.ones(2, 3), torch.ones(4, 3), None, "none", [], "")
    except (AttributeError, RuntimeError, TypeError):
        return None
    return op if torch.equal(out, torch.full((2, 4), 3.0)) else None


def _onednn(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return _onednn_linear_op()(x, w, b, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """x W^T + b on oneDNN's GEMM; backward: dx on it too, dW and db as F.linear's backward does."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _onednn(x, w, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: Tensor):
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _onednn(gy, w.t().contiguous(), None)
        gy2 = gy.reshape(-1, gy.shape[-1])
        if ctx.needs_input_grad[1]:
            gw = gy2.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy2.sum(0)
        return gx, gw, gb


# Multiply-adds from which a projection runs on oneDNN: below, its per-call cost (~20 us against
# MKL's ~10) outweighs its faster GEMM (equal at ~6M; NOTES v26).
_ONEDNN_MIN_MACS = 1 << 22


@functools.cache
def _cpu_bf16_gemm() -> bool:
    """Whether oneDNN multiplies bf16 natively on this CPU (AVX512-BF16 or AMX). Without it (AVX2
    CPUs such as Zen 3) a bf16 ``F.linear`` runs ~9x slower than widening to float32 (a [8192, 256]
    by [768, 256] projection: 258 against 29 ms on Zen 3)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``F.linear``; for float32 CPU calls of at least ``_ONEDNN_MIN_MACS``, on oneDNN's GEMM (forward
    and the input gradient), which runs at ~190 GFLOP/s on the 2-core Zen 4 VM against ~140 for
    ``F.linear`` (MKL): the projections are most of a MultiheadAttention call (NOTES v23). bf16 CPU
    calls where the CPU has no bf16 GEMM (``_cpu_bf16_gemm``) multiply in float32 and round the result
    to bf16, as a bf16 GEMM accumulating in float32 would (gradients through the same casts). Not under
    torch.compile (which lowers F.linear itself)."""
    if (
        x.device.type == "cpu"
        and x.dtype == w.dtype == torch.bfloat16
        and (b is None or b.dtype == torch.bfloat16)
        and not torch.compiler.is_compiling()
        and not _cpu_bf16_gemm()
    ):
        return _linear(x.float(), w.float(), None if b is None else b.float()).to(torch.bfloat16)
    if (
        x.device.type != "cpu"
        or not (x.dtype == w.dtype == torch.float32)
        or x.numel() * w.shape[0] < _ONEDNN_MIN_MACS
        or torch.compiler.is_compiling()
        or _onednn_linear_op() is None
    ):
        return F.linear(x, w, b)
    if torch.is_grad_enabled() and (
        x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)
    ):
        return _OneDnnLinear.apply(x, w, b)
    return _onednn(x, w, b)


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in for ``nn.MultiheadAttention``: same constructor, parameters, state dict and forward.

    ``forward`` runs the projections with ``F.linear`` (on oneDNN's GEMM for float32 CPU tensors) and
    the attention with ``bigmodel.ops.attention``; a right-padded boolean ``key_padding_mask`` becomes
    ``key_lengths``, so padded key blocks are skipped; dropout (while training) is the kernel's, with
    its own random stream. ``need_weights=True`` (the default, as in PyTorch) adds
    ``bigmodel.ops.attention_weights``: the probabilities recomputed from the kernel's logsumexp
    (averaged over heads as they are made, unless ``average_attn_weights=False``), with the kernel's
    dropout, differentiable; on CPU only (CUDA calls that need weights take PyTorch's path). Calls the
    kernel cannot serve - ``add_bias_kv``, ``add_zero_attn`` - take ``nn.MultiheadAttention``'s own
    (slower) path. Unlike PyTorch, a query with no key to attend to gets zeros (output and weights)
    rather than NaN on the fast path.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Args and returns as ``nn.MultiheadAttention.forward``."""
        if (
            self.bias_k is not None
            or self.add_zero_attn
            or (is_causal and attn_mask is None)
            or not _has_kernel(query.device)
            or (need_weights and not _has_kernel(query.device, "bigmodel::attention_weights"))
            # a learned mask's gradient: bigmodel's kernels compute it on the CPU only
            or (
                attn_mask is not None
                and attn_mask.requires_grad
                and torch.is_grad_enabled()
                and query.device.type != "cpu"
            )
        ):
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        batched = query.dim() == 3
        self_attention = query is key and key is value
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        # Projections keep the caller's layout; the kernel reads the heads through strides, so
        # neither the inputs nor q/k/v are transposed or copied.
        batch_first = batched and self.batch_first
        if batch_first:
            N, L, E = query.shape
            S = key.shape[1]
        else:
            L, N, E = query.shape
            S = key.shape[0]
        H, hd = self.num_heads, self.head_dim

        def heads(x: Tensor, length: int) -> Tensor:  # (.., E) projection -> [N, H, length, hd] view
            if batch_first:
                return x.view(N, length, H, hd).transpose(1, 2)
            return x.view(length, N, H, hd).permute(1, 2, 0, 3)

        if self._qkv_same_embed_dim and self_attention:
            q, k, v = (
                heads(t, L) for t in _linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, -1)
            )
        else:
            if self._qkv_same_embed_dim:
                w_q, w_k, w_v = self.in_proj_weight.chunk(3)
            else:
                w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
            b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
            q = heads(_linear(query, w_q, b_q), L)
            k = heads(_linear(key, w_k, b_k), S)
            v = heads(_linear(value, w_v, b_v), S)

        mask = _attend_mask(attn_mask, N, H, L, S, query.dtype)
        key_lengths = None
        if key_padding_mask is not None:
            key_lengths = _right_padded_lengths(key_padding_mask)
            if key_lengths is None:
                kpm = _attend_mask(key_padding_mask.view(N, 1, 1, S), N, H, L, S, query.dtype)
                mask = _merge(mask, kpm, query.dtype)
        causal = is_causal and key_padding_mask is None  # as PyTorch: then attn_mask is only a hint
        if causal:
            mask = None
        dropout_p = self.dropout if self.training else 0.0
        # One seed for the output's dropout and the weights' (they are the same draw).
        seed = int(torch.randint(0, 2**31, ())) if dropout_p > 0.0 else 0
        out, lse = attention(q, k, v, mask, key_lengths, causal, None, dropout_p, seed)
        weights = None
        if need_weights:
            weights = attention_weights(
                q, k, lse, mask, key_lengths, causal, None, dropout_p, seed, average_attn_weights
            )
            if not batched:
                weights = weights.squeeze(0)
        out = (
            out.transpose(1, 2).reshape(N, L, E) if batch_first else out.permute(2, 0, 1, 3).reshape(L, N, E)
        )
        out = _linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(1)
        return out, weights


def _has_kernel(device: torch.device, op: str = "bigmodel::attention") -> bool:
    """Whether bigmodel's ``op`` has a kernel for ``device`` (CUDA only when built with it)."""
    if device.type == "cpu":
        return True
    key = {"cuda": "CUDA"}.get(device.type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def _attend_mask(mask: Tensor | None, N: int, H: int, L: int, S: int, dtype: torch.dtype) -> Tensor | None:
    """nn.MultiheadAttention's mask (bool True = masked, or additive; ``(L, S)``, ``(N*H, L, S)`` or
    ``(N, 1, 1, S)``) as the kernel's: bool True = attend, or additive, broadcastable to (N, H, L, S)."""
    if mask is None:
        return None
    if mask.dim() == 3:
        mask = mask.view(N, H, L, S)
    return mask.logical_not() if mask.dtype == torch.bool else mask.to(dtype)


def _merge(a: Tensor | None, b: Tensor, dtype: torch.dtype) -> Tensor:
    """Both masks at once: bool if both are, else additive in ``dtype``."""
    if a is None:
        return b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    return _additive(a, dtype) + _additive(b, dtype)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _right_padded_lengths(key_padding_mask: Tensor) -> Tensor | None:
    """Lengths if every row of the boolean ``(N, S)`` mask is ``False * n + True * (S - n)``."""
    if key_padding_mask.dtype != torch.bool:
        return None
    if torch.compiler.is_compiling() or (
        key_padding_mask.is_cuda and torch.cuda.is_current_stream_capturing()
    ):
        # The check below reads a value (a data-dependent branch for torch.compile, a GPU read under
        # graph capture): the mask path serves, and the CPU kernel finds the padding in the mask itself.
        return None
    lengths = (~key_padding_mask).sum(dim=1)
    padded = torch.arange(key_padding_mask.shape[1], device=key_padding_mask.device) >= lengths.unsqueeze(1)
    return lengths if bool((padded == key_padding_mask).all()) else None
