"""Inside torch.autocast the drop-ins run in the autocast dtype, as the native layers do: same output
dtypes, results within that dtype's rounding of native's, float32 gradients for float32 parameters."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bigmodel
import bigmodel.nn.functional as BF


def autocast_dtypes(device):
    # On this CPU native nn.LSTM fails under float16 autocast (oneDNN has no such primitive here), so
    # float16 on the CPU is checked against float32 instead (test_float16_autocast_on_cpu).
    return [torch.bfloat16] if device == "cpu" else [torch.float16, torch.bfloat16]


def native_under_autocast(ref, x, device, dtype):
    """Native `ref(x)` under autocast, and the layer whose gradients to compare with. oneDNN has no bf16
    LSTM on CPUs without AVX-512 (AMD Zen 3, for one: "could not create a primitive descriptor"); there
    the reference is the float32 layer on the input and weights rounded to `dtype`, which is what the
    autocast LSTM multiplies, with its outputs rounded to `dtype`."""
    try:
        with torch.autocast(device_type=device, dtype=dtype):
            return ref, ref(x)
    except RuntimeError as e:
        if device != "cpu" or "primitive descriptor" not in str(e):
            raise
    rounded = copy.deepcopy(ref)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(dtype))
    o, (h, c) = rounded(x.to(dtype).float())
    return rounded, (o.to(dtype), (h.to(dtype), c.to(dtype)))


def close(a, b, dtype):
    """Within a few roundings of the autocast dtype, relative to the larger magnitude."""
    eps = torch.finfo(dtype).eps
    scale = max(a.abs().max().item(), b.abs().max().item(), 1.0)
    return (a.float() - b.float()).abs().max().item() <= 8 * eps * scale


@pytest.mark.parametrize("kwargs", [dict(), dict(num_layers=2, bidirectional=True, batch_first=True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_lstm_under_autocast(device, kwargs, dtype):
    if dtype not in autocast_dtypes(device):
        pytest.skip("native nn.LSTM has no float16 LSTM on the CPU (oneDNN); test_float16_autocast_on_cpu")
    torch.manual_seed(0)
    ref = nn.LSTM(10, 16, **kwargs).to(device)
    ours = bigmodel.nn.LSTM(10, 16, **kwargs).to(device)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(7, 5, 10, device=device)
    ref, (o_ref, (h_ref, c_ref)) = native_under_autocast(ref, x, device, dtype)
    with torch.autocast(device_type=device, dtype=dtype):
        o, (h, c) = ours(x)
    for got, want in ((o, o_ref), (h, h_ref), (c, c_ref)):
        assert got.dtype == want.dtype == dtype
        assert close(got, want, dtype)
    o_ref.float().sum().backward()
    o.float().sum().backward()
    for p_ours, p_ref in zip(ours.parameters(), ref.parameters(), strict=True):
        assert p_ours.grad.dtype == p_ref.grad.dtype == torch.float32
        assert close(p_ours.grad, p_ref.grad, dtype)


def test_float16_autocast_on_cpu():
    torch.manual_seed(0)
    lstm = bigmodel.nn.LSTM(10, 16, num_layers=2)
    x = torch.randn(7, 5, 10)
    want, _ = lstm(x)
    with torch.autocast(device_type="cpu", dtype=torch.float16):
        got, _ = lstm(x)
    assert got.dtype == torch.float16
    assert close(got, want, torch.float16)


def test_lstm_cell_and_lengths_under_autocast(device):
    """nn.LSTMCell is autocast on CUDA (lstm_cell is on its list) but not on the CPU; the drop-in
    follows both."""
    dtype = autocast_dtypes(device)[0]
    torch.manual_seed(0)
    cell_ref = nn.LSTMCell(6, 9).to(device)
    cell = bigmodel.nn.LSTMCell(6, 9).to(device)
    cell.load_state_dict(cell_ref.state_dict())
    lstm = bigmodel.nn.LSTM(6, 9).to(device)
    x = torch.randn(4, 3, 6, device=device)
    with torch.autocast(device_type=device, dtype=dtype):
        h_ref, c_ref = cell_ref(x[0])
        h, c = cell(x[0])
        out, _ = lstm(x, lengths=torch.tensor([4, 2, 1]))
    cell_dtype = dtype if device == "cuda" else torch.float32
    assert h.dtype == h_ref.dtype == cell_dtype and c.dtype == c_ref.dtype == cell_dtype
    assert close(h, h_ref, dtype) and close(c, c_ref, dtype)
    assert out.dtype == dtype and (out[2:, 1] == 0).all() and (out[1:, 2] == 0).all()


def test_float64_is_left_alone(device):
    """Autocast casts float32 only, as ATen's rule does: a float64 LSTM stays float64."""
    lstm = bigmodel.nn.LSTM(4, 5).to(device, torch.float64)
    with torch.autocast(device_type=device, dtype=autocast_dtypes(device)[0]):
        out, _ = lstm(torch.randn(3, 2, 4, device=device, dtype=torch.float64))
    assert out.dtype == torch.float64


@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_under_autocast(device, is_causal):
    dtype = autocast_dtypes(device)[0]
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 33, 32, device=device, requires_grad=True) for _ in range(3))
    with torch.autocast(device_type=device, dtype=dtype):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        got = BF.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    assert got.dtype == want.dtype == dtype
    assert close(got, want, dtype)
    (g,) = torch.autograd.grad(got.float().sum(), [q])
    assert g.dtype == torch.float32


def test_multihead_attention_under_autocast(device):
    dtype = autocast_dtypes(device)[0]
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(32, 4, batch_first=True).to(device)
    ours = bigmodel.nn.MultiheadAttention(32, 4, batch_first=True).to(device)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 11, 32, device=device)
    pad = torch.zeros(3, 11, dtype=torch.bool, device=device)
    pad[1, 7:] = True
    with torch.autocast(device_type=device, dtype=dtype):
        want, _ = ref(x, x, x, key_padding_mask=pad, need_weights=False)
        got, _ = ours(x, x, x, key_padding_mask=pad, need_weights=False)
    assert got.dtype == want.dtype == dtype
    assert close(got, want, dtype)


def test_autocast_inside_torch_compile():
    """An autocast region in a compiled function (fullgraph) gives eager's result and dtype."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    lstm = bigmodel.nn.LSTM(8, 16, num_layers=2)
    x = torch.randn(5, 3, 8)

    def f(x):
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            out, _ = lstm(x)
        return out

    want = f(x)
    got = torch.compile(f, fullgraph=True)(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)
