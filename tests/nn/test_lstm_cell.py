"""bigmodel.nn.LSTMCell against torch.nn.LSTMCell: outputs and every gradient, after copying weights."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import bigmodel

TOL = {"atol": 1e-5, "rtol": 1e-4}


def make_pair(input_size, hidden_size, device, dtype=torch.float32, bias=True):
    ref = nn.LSTMCell(input_size, hidden_size, bias=bias, device=device, dtype=dtype)
    ours = bigmodel.nn.LSTMCell(input_size, hidden_size, bias=bias, device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def run(cell, x, hx=None):
    h, c = cell(x, hx)
    gen = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=gen).to(t)).sum() for t in (h, c))
    leaves = [t for t in (x, *(hx or ())) if t.requires_grad] + list(cell.parameters())
    return h, c, torch.autograd.grad(loss, leaves)


def assert_same_run(a, b, tol):
    torch.testing.assert_close(b[0], a[0], **tol)
    torch.testing.assert_close(b[1], a[1], **tol)
    assert len(a[2]) == len(b[2])
    for ga, gb in zip(a[2], b[2], strict=True):
        torch.testing.assert_close(gb, ga, **tol)


@pytest.mark.parametrize(
    "B,H,bias,with_hx", list(itertools.product([1, 3, 7], [1, 5, 33], [False, True], [False, True]))
)
def test_matches_nn_lstm_cell(device, B, H, bias, with_hx):
    IN = 6
    ref, ours = make_pair(IN, H, device, bias=bias)
    x = torch.randn(B, IN, device=device, requires_grad=True)
    hx = None
    if with_hx:
        hx = tuple(torch.randn(B, H, device=device, requires_grad=True) for _ in range(2))
    assert_same_run(run(ref, x, hx), run(ours, x, hx), TOL)


@pytest.mark.parametrize("with_hx", [False, True])
def test_unbatched(device, with_hx):
    ref, ours = make_pair(4, 5, device)
    x = torch.randn(4, device=device, requires_grad=True)
    hx = tuple(torch.randn(5, device=device, requires_grad=True) for _ in range(2)) if with_hx else None
    a, b = run(ref, x, hx), run(ours, x, hx)
    assert b[0].shape == (5,) and b[1].shape == (5,)
    assert_same_run(a, b, TOL)


def test_unrolled_sequence_matches_lstm(device):
    """Stepping the cell over a sequence gives bigmodel.nn.LSTM's result with the same weights."""
    cell = bigmodel.nn.LSTMCell(4, 5, device=device)
    lstm = bigmodel.nn.LSTM(4, 5, device=device)
    lstm.load_state_dict({f"{k}_l0": v for k, v in cell.state_dict().items()})
    x = torch.randn(7, 3, 4, device=device)
    h = c = torch.zeros(3, 5, device=device)
    outs = []
    for t in range(7):
        h, c = cell(x[t], (h, c))
        outs.append(h)
    out, (h_n, c_n) = lstm(x)
    torch.testing.assert_close(torch.stack(outs), out, **TOL)
    torch.testing.assert_close(h, h_n[0], **TOL)
    torch.testing.assert_close(c, c_n[0], **TOL)


def test_non_contiguous(device):
    ref, ours = make_pair(4, 5, device)
    x = torch.randn(3, 8, device=device)[:, ::2].requires_grad_()
    h = torch.randn(5, 3, device=device).T
    c = torch.randn(5, 3, device=device).T
    assert not x.is_contiguous() and not h.is_contiguous()
    assert_same_run(run(ref, x, (h, c)), run(ours, x, (h, c)), TOL)


def test_bfloat16_error_within_twice_pytorch(device):
    ref16, ours16 = make_pair(8, 33, device, torch.bfloat16)
    ref64 = nn.LSTMCell(8, 33, device=device, dtype=torch.float64)
    ref64.load_state_dict(ref16.state_dict())
    x16 = torch.randn(7, 8, device=device, dtype=torch.bfloat16)
    hx16 = tuple(torch.randn(7, 33, device=device, dtype=torch.bfloat16) for _ in range(2))
    gold = ref64(x16.double(), tuple(t.double() for t in hx16))
    for r, o, g in zip(ref16(x16, hx16), ours16(x16, hx16), gold, strict=True):
        assert o.dtype == torch.bfloat16
        err_ref = (r.double() - g).abs().max().item()
        err_ours = (o.double() - g).abs().max().item()
        assert err_ours <= 2 * err_ref + 1e-3, (err_ours, err_ref)


@pytest.mark.parametrize("bias", [False, True])
def test_parameters_state_dict_repr(device, bias):
    ref, ours = make_pair(4, 5, device, bias=bias)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [
        (n, p.shape) for n, p in ref.named_parameters()
    ]
    assert repr(ours) == repr(ref)
    assert (ours.bias_ih is None) == (not bias)
    fresh = bigmodel.nn.LSTMCell(4, 5, bias=bias, device=device)
    ref.load_state_dict(fresh.state_dict(), strict=True)
    for a, b in zip(ref.parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    bound = 1 / math.sqrt(5)
    assert all(p.abs().max() <= bound for p in fresh.parameters())
