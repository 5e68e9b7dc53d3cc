"""Bad input to bigmodel.nn.LSTM / LSTMCell: an error whose message names the argument, expected and got."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import bigmodel

T, B, IN, H, P = 7, 3, 4, 5, 2


@pytest.fixture
def lstm(device):
    return bigmodel.nn.LSTM(IN, H, num_layers=2, proj_size=P, device=device)


def hx(device, LD=2, b=B, p=P, h=H, dtype=torch.float32):
    return torch.zeros(LD, b, p, device=device, dtype=dtype), torch.zeros(
        LD, b, h, device=device, dtype=dtype
    )


def x(device, *shape, dtype=torch.float32):
    return torch.randn(shape or (T, B, IN), device=device, dtype=dtype)


LSTM_CASES = {
    # name: (call(lstm, device), exception type, regex)
    "input-4d": (
        lambda m, d: m(x(d, T, B, IN, 1)),
        ValueError,
        r"input must be 2-D .* or 3-D .*got 4-D shape \(7, 3, 4, 1\)",
    ),
    "input-1d": (lambda m, d: m(x(d, IN)), ValueError, r"input must be 2-D .*got 1-D"),
    "input-features": (
        lambda m, d: m(x(d, T, B, IN + 1)),
        RuntimeError,
        r"input\.size\(-1\) must be equal to input_size\. Expected 4, got 5",
    ),
    "input-dtype": (
        lambda m, d: m(x(d, dtype=torch.float64)),
        ValueError,
        r"input dtype \(torch\.float64\) does not match weight dtype \(torch\.float32\)",
    ),
    "input-device": (lambda m, d: m(x("meta")), RuntimeError, r"input is on meta but the weights are on"),
    "empty-batch": (
        lambda m, d: m(x(d, T, 0, IN)),
        ValueError,
        r"input has an empty batch \(B = 0\), shape \(7, 0, 4\)",
    ),
    "no-steps": (
        lambda m, d: m(x(d, 0, B, IN)),
        ValueError,
        r"input must have at least one time step, got T = 0",
    ),
    "hx-not-tuple": (
        lambda m, d: m(x(d), hx(d)[0]),
        ValueError,
        r"hx must be a tuple \(h_0, c_0\), got Tensor",
    ),
    "hx-short": (
        lambda m, d: m(x(d), hx(d)[:1]),
        ValueError,
        r"hx must be a tuple \(h_0, c_0\), got tuple of length 1",
    ),
    "hx-rank-batched": (
        lambda m, d: m(x(d), (hx(d)[0][0], hx(d)[1])),
        RuntimeError,
        r"for batched 3-D input, hx \(h_0, c_0\) must be 3-D, got \(2-D, 3-D\)",
    ),
    "hx-rank-unbatched": (
        lambda m, d: m(x(d, T, IN), hx(d, b=1)),
        RuntimeError,
        r"for unbatched 2-D input, hx \(h_0, c_0\) must be 2-D, got \(3-D, 3-D\)",
    ),
    "h0-layers": (
        lambda m, d: m(x(d), hx(d, LD=1)),
        RuntimeError,
        r"hx\[0\] \(h_0\) must have shape \(2, 3, 2\) .*got \(1, 3, 2\)",
    ),
    "h0-batch": (
        lambda m, d: m(x(d), hx(d, b=B + 1)),
        RuntimeError,
        r"hx\[0\] \(h_0\) must have shape \(2, 3, 2\) .*got \(2, 4, 2\)",
    ),
    "h0-size": (
        lambda m, d: m(x(d), hx(d, p=H)),
        RuntimeError,
        r"hx\[0\] \(h_0\) must have shape \(2, 3, 2\) .*got \(2, 3, 5\)",
    ),
    "c0-size": (
        lambda m, d: m(x(d), hx(d, h=P)),
        RuntimeError,
        r"hx\[1\] \(c_0\) must have shape \(2, 3, 5\) .*got \(2, 3, 2\)",
    ),
    "hx-dtype": (
        lambda m, d: m(x(d), hx(d, dtype=torch.float64)),
        ValueError,
        r"hx\[0\] \(h_0\) has dtype torch\.float64 but input has dtype torch\.float32",
    ),
    "hx-device": (
        lambda m, d: m(x(d), (hx(d)[0], hx("meta")[1])),
        RuntimeError,
        r"hx\[1\] \(c_0\) is on meta but input is on",
    ),
    "lengths-float": (
        lambda m, d: m(x(d), lengths=torch.ones(B)),
        ValueError,
        r"lengths must be an integer tensor, got dtype torch\.float32",
    ),
    "lengths-bool": (
        lambda m, d: m(x(d), lengths=torch.ones(B, dtype=torch.bool)),
        ValueError,
        r"lengths must be an integer tensor, got dtype torch\.bool",
    ),
    "lengths-2d": (
        lambda m, d: m(x(d), lengths=torch.ones(B, 1, dtype=torch.long)),
        ValueError,
        r"lengths must be 1-D with one entry per sequence, expected shape \(3,\), got \(3, 1\)",
    ),
    "lengths-count": (
        lambda m, d: m(x(d), lengths=torch.ones(B - 1, dtype=torch.long)),
        ValueError,
        r"lengths must be 1-D with one entry per sequence, expected shape \(3,\), got \(2,\)",
    ),
    "lengths-zero": (
        lambda m, d: m(x(d), lengths=torch.tensor([T, 0, 1])),
        RuntimeError,
        r"lengths must lie in \[1, T=7\], got lengths\[1\] = 0",
    ),
    "lengths-too-long": (
        lambda m, d: m(x(d), lengths=torch.tensor([T, 1, T + 1])),
        RuntimeError,
        r"lengths must lie in \[1, T=7\], got lengths\[2\] = 8",
    ),
    "lengths-with-packed": (
        lambda m, d: m(pack_padded_sequence(x(d), torch.tensor([T, 2, 1])), lengths=torch.tensor([T, 2, 1])),
        ValueError,
        r"lengths must be None for a PackedSequence input",
    ),
    "packed-features": (
        lambda m, d: m(pack_padded_sequence(x(d, T, B, IN + 1), torch.tensor([T, 2, 1]))),
        RuntimeError,
        r"input\.size\(-1\) must be equal to input_size\. Expected 4, got 5",
    ),
    "packed-h0-batch": (
        lambda m, d: m(pack_padded_sequence(x(d), torch.tensor([T, 2, 1])), hx(d, b=2)),
        RuntimeError,
        r"hx\[0\] \(h_0\) must have shape \(2, 3, 2\) .*got \(2, 2, 2\)",
    ),
}


@pytest.mark.parametrize("case", list(LSTM_CASES))
def test_lstm_bad_input(lstm, device, case):
    call, exc, pattern = LSTM_CASES[case]
    with pytest.raises(exc, match=pattern):
        call(lstm, device)


def test_lstm_bad_input_messages_name_the_module(lstm, device):
    for call, exc, _ in LSTM_CASES.values():
        with pytest.raises(exc, match=r"^bigmodel\.(nn\.LSTM|lstm): "):
            call(lstm, device)


def cell_hx(device, b=B, h=H, dtype=torch.float32):
    return torch.zeros(b, h, device=device, dtype=dtype), torch.zeros(b, h, device=device, dtype=dtype)


CELL_CASES = {
    "input-3d": (
        lambda m, d: m(x(d, 2, B, IN)),
        ValueError,
        r"input must be 1-D \(input_size,\) unbatched or 2-D \(batch, input_size\), got 3-D",
    ),
    "input-features": (
        lambda m, d: m(x(d, B, IN + 1)),
        RuntimeError,
        r"input\.size\(-1\) must be equal to input_size\. Expected 4, got 5",
    ),
    "input-dtype": (
        lambda m, d: m(x(d, B, IN, dtype=torch.float64)),
        ValueError,
        r"input dtype \(torch\.float64\) does not match weight dtype \(torch\.float32\)",
    ),
    "input-device": (
        lambda m, d: m(x("meta", B, IN)),
        RuntimeError,
        r"input is on meta but the weights are on",
    ),
    "empty-batch": (lambda m, d: m(x(d, 0, IN)), ValueError, r"input has an empty batch \(B = 0\)"),
    "hx-not-tuple": (
        lambda m, d: m(x(d, B, IN), cell_hx(d)[0]),
        ValueError,
        r"hx must be a tuple \(h, c\), got Tensor",
    ),
    "hx-rank": (
        lambda m, d: m(x(d, B, IN), (cell_hx(d)[0][0], cell_hx(d)[1])),
        ValueError,
        r"hx\[0\] must be 2-D like input, got 1-D shape \(5,\)",
    ),
    "h-batch": (
        lambda m, d: m(x(d, B, IN), cell_hx(d, b=B + 1)),
        RuntimeError,
        r"hx\[0\] \(h\) must have shape \(3, 5\) \(batch, hidden_size\), got \(4, 5\)",
    ),
    "c-size": (
        lambda m, d: m(x(d, B, IN), (cell_hx(d)[0], cell_hx(d, h=H + 1)[1])),
        RuntimeError,
        r"hx\[1\] \(c\) must have shape \(3, 5\) \(batch, hidden_size\), got \(3, 6\)",
    ),
    "hx-dtype": (
        lambda m, d: m(x(d, B, IN), cell_hx(d, dtype=torch.float64)),
        ValueError,
        r"hx\[0\] \(h\) has dtype torch\.float64 but input has dtype torch\.float32",
    ),
}


@pytest.mark.parametrize("case", list(CELL_CASES))
def test_lstm_cell_bad_input(device, case):
    cell = bigmodel.nn.LSTMCell(IN, H, device=device)
    call, exc, pattern = CELL_CASES[case]
    with pytest.raises(exc, match=r"^bigmodel\.nn\.LSTMCell: .*" + pattern):
        call(cell, device)
