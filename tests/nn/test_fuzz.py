"""Hypothesis over shapes and flags: bigmodel.nn.LSTM (float64) against bigmodel.reference."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bigmodel
from bigmodel.reference import lstm_reference

TOL = {"atol": 1e-10, "rtol": 1e-8}


@st.composite
def configs(draw):
    H = draw(st.integers(1, 9))
    return dict(
        T=draw(st.integers(1, 9)),
        B=draw(st.integers(1, 6)),
        IN=draw(st.integers(1, 7)),
        H=H,
        proj_size=draw(st.integers(0, H - 1)),
        num_layers=draw(st.integers(1, 3)),
        bidirectional=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bias=draw(st.booleans()),
        with_hx=draw(st.booleans()),
        with_lengths=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=configs())
def test_lstm_matches_reference(device, cfg):
    gen = torch.Generator().manual_seed(cfg["seed"])
    T, B, IN, H, P = cfg["T"], cfg["B"], cfg["IN"], cfg["H"], cfg["proj_size"]
    D = 2 if cfg["bidirectional"] else 1
    L = cfg["num_layers"]
    torch.manual_seed(cfg["seed"])
    lstm = bigmodel.nn.LSTM(
        IN,
        H,
        num_layers=L,
        bias=cfg["bias"],
        batch_first=cfg["batch_first"],
        bidirectional=cfg["bidirectional"],
        proj_size=P,
        device=device,
        dtype=torch.float64,
    )

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(device).requires_grad_()

    x = randn(T, B, IN)
    hx = (randn(L * D, B, P or H), randn(L * D, B, H)) if cfg["with_hx"] else None
    lengths = torch.randint(1, T + 1, (B,), generator=gen) if cfg["with_lengths"] else None

    x_in = x.transpose(0, 1) if cfg["batch_first"] else x
    out, (h_n, c_n) = lstm(x_in, hx, lengths=lengths)
    if cfg["batch_first"]:
        out = out.transpose(0, 1)
    ref_out, (ref_h, ref_c) = lstm_reference(
        x, hx, lstm.all_weights, L, cfg["bidirectional"], bias=cfg["bias"], proj_size=P, lengths=lengths
    )
    assert out.shape == (T, B, D * (P or H))
    for a, b in ((out, ref_out), (h_n, ref_h), (c_n, ref_c)):
        torch.testing.assert_close(a, b, **TOL)

    seeds = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(device) for t in (out, h_n, c_n)]
    leaves = [x, *(hx or ()), *lstm.parameters()]
    loss = sum((t * s).sum() for t, s in zip((out, h_n, c_n), seeds, strict=True))
    ref_loss = sum((t * s).sum() for t, s in zip((ref_out, ref_h, ref_c), seeds, strict=True))
    grads = torch.autograd.grad(loss, leaves)
    ref_grads = torch.autograd.grad(ref_loss, leaves)
    for g, gr in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, gr, **TOL)
