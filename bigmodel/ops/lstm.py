"""Typed wrapper and fake kernels of ``torch.ops.bigmodel.lstm_layer`` and its backward.

The op runs the whole time loop of one LSTM layer in one direction (contract: csrc/lstm/lstm.h). Its
autograd formula is a C++ kernel (csrc/lstm/lstm_autograd.cpp): a step-by-step loop calls the op once
per step, and a Python formula cost as much per step as the step's math.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lstm_layer"]


def lstm_layer(
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
    train: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer, one direction, all steps in one call.

    Args:
        input: ``(T, B, I)``.
        h0: ``(B, P)`` with ``P = proj_size`` if ``w_hr`` is given, else ``H``.
        c0: ``(B, H)``.
        w_ih: ``(4H, I)``; w_hh: ``(4H, P)``; b_ih, b_hh: ``(4H,)`` or None; w_hr: ``(P, H)`` or None.
            Gate order i, f, g, o (as ``nn.LSTM``).
        lengths: ``(B,)`` integer tensor with values in ``[1, T]``, or None (all ``T``). Steps past a
            sequence's end leave its state alone and give zero output.
        reverse: read each sequence backward from its last valid step.
        train: keep what backward needs. Default: whenever autograd will need it.

    Returns:
        ``(output (T, B, P), h_n (B, P), c_n (B, H))``.
    """
    if train is None:
        train = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
        )
    # The overload itself: the packet would resolve it on every call (~3 us of a ~50 us LSTMCell step).
    out, h_n, c_n, _, _ = torch.ops.bigmodel.lstm_layer.default(
        input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, train
    )
    return out, h_n, c_n


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _saved_dtype(input: torch.Tensor) -> torch.dtype:
    """dtype of the gates and cells the forward saves for backward (csrc/lstm/lstm.h): bf16 for a
    bf16 layer on the CPU, else the compute dtype."""
    if input.dtype == torch.bfloat16 and input.device.type == "cpu":
        return torch.bfloat16
    return _compute_dtype(input.dtype)


@torch.library.register_fake("bigmodel::lstm_layer")
def _lstm_layer_fake(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, train):
    torch._check(input.dim() == 3, lambda: f"bigmodel.lstm: input must be 3-D (T, B, I), got {input.shape}")
    T, B, _ = input.shape
    H = c0.shape[-1]
    P = h0.shape[-1]
    ct = _saved_dtype(input)
    out = input.new_empty((T, B, P))
    h_n = input.new_empty((B, P))
    c_n = input.new_empty((B, H))
    if train:
        gates = input.new_empty((T * B, 4 * H), dtype=ct)
        cells = input.new_empty((T * B, H), dtype=ct)
    else:
        gates = input.new_empty((0,), dtype=ct)
        cells = input.new_empty((0,), dtype=ct)
    return out, h_n, c_n, gates, cells


@torch.library.register_fake("bigmodel::lstm_layer_backward")
def _lstm_layer_backward_fake(
    grad_output,
    grad_h_n,
    grad_c_n,
    input,
    h0,
    c0,
    w_ih,
    w_hh,
    w_hr,
    lengths,
    output,
    gates,
    cells,
    reverse,
    has_bias,
    input_grad=True,
):
    grad_bias = w_ih.new_empty((w_ih.shape[0],)) if has_bias else w_ih.new_empty((0,))
    grad_w_hr = torch.empty_like(w_hr) if w_hr is not None else w_ih.new_empty((0,))
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format)
        if input_grad
        else input.new_empty((0,)),
        torch.empty_like(h0, memory_format=torch.contiguous_format),
        torch.empty_like(c0, memory_format=torch.contiguous_format),
        torch.empty_like(w_ih, memory_format=torch.contiguous_format),
        torch.empty_like(w_hh, memory_format=torch.contiguous_format),
        grad_bias,
        grad_w_hr,
    )
