"""bigmodel.nn.MultiheadAttention against nn.MultiheadAttention with the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bigmodel.nn
import bigmodel.nn.attention

pytestmark = pytest.mark.op("bigmodel::attention")


TOL = {"atol": 2e-5, "rtol": 1e-4}


def pair(device, **kwargs):
    ref = nn.MultiheadAttention(**kwargs).to(device)
    ours = bigmodel.nn.MultiheadAttention(**kwargs).to(device)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def check(ref, ours, inputs, **fw):
    """Outputs, weights and the gradients of a loss on both (when weights are returned) agree."""
    inputs = [x.detach().requires_grad_() for x in inputs]
    out, w = ours(*inputs, **fw)
    ref_out, ref_w = ref(*inputs, **fw)
    torch.testing.assert_close(out, ref_out, **TOL)
    if ref_w is None:
        assert w is None
    else:
        torch.testing.assert_close(w, ref_w, **TOL)
    seed = torch.randn_like(out)
    loss, ref_loss = (out * seed).sum(), (ref_out * seed).sum()
    if ref_w is not None:
        seed_w = torch.randn_like(w)
        loss, ref_loss = loss + (w * seed_w).sum(), ref_loss + (ref_w * seed_w).sum()
    params = [p for p in ours.parameters()]
    g = torch.autograd.grad(loss, inputs + params)
    gr = torch.autograd.grad(ref_loss, inputs + list(ref.parameters()))
    for a, b in zip(g, gr, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kvdim", [None, 6])
def test_matches_native(device, batch_first, bias, kvdim):
    ref, ours = pair(
        device, embed_dim=16, num_heads=4, bias=bias, kdim=kvdim, vdim=kvdim, batch_first=batch_first
    )
    N, L, S = 3, 7, 9
    E_kv = kvdim or 16
    shape = (lambda a, b, c: (b, a, c)) if batch_first else (lambda a, b, c: (a, b, c))
    q = torch.randn(*shape(L, N, 16), device=device)
    k = torch.randn(*shape(S, N, E_kv), device=device)
    v = torch.randn(*shape(S, N, E_kv), device=device)
    check(ref, ours, [q, k, v], need_weights=False)
    check(ref, ours, [q, k, v], need_weights=True)


# Mixing a float key_padding_mask with a bool attn_mask (or back) is deprecated in PyTorch, still supported.
@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask:UserWarning")
@pytest.mark.parametrize("padding", ["right", "arbitrary", "float"])
@pytest.mark.parametrize("mask", [None, "bool", "float", "per-head"])
def test_masks(device, padding, mask):
    ref, ours = pair(device, embed_dim=16, num_heads=2)
    N, L = 3, 8
    x = torch.randn(L, N, 16, device=device)
    lengths = torch.tensor([8, 3, 5], device=device)
    kpm = torch.arange(L, device=device) >= lengths.unsqueeze(1)
    if padding == "arbitrary":
        kpm = kpm.flip(1)
    elif padding == "float":
        kpm = torch.zeros(N, L, device=device).masked_fill(kpm, float("-inf"))
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.ones(L, L, dtype=torch.bool, device=device).triu(1)  # causal
    elif mask == "float":
        attn_mask = torch.randn(L, L, device=device)
    elif mask == "per-head":
        attn_mask = torch.randn(N * 2, L, L, device=device)
    if mask == "bool" and padding == "arbitrary":
        attn_mask = attn_mask.flip(1)  # keep every row with at least one key (native gives NaN)
    check(ref, ours, [x, x, x], key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)
    check(ref, ours, [x, x, x], key_padding_mask=kpm, attn_mask=attn_mask)
    check(ref, ours, [x, x, x], key_padding_mask=kpm, attn_mask=attn_mask, average_attn_weights=False)


@pytest.mark.parametrize("mask", ["2d", "per-head"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_learned_attn_mask(mask, need_weights):
    """A float attn_mask that requires grad gets native's gradient, with and without the weights in
    the loss (with a key_padding_mask merged into it)."""
    ref, ours = pair("cpu", embed_dim=16, num_heads=2)
    N, L = 3, 8
    x = torch.randn(L, N, 16)
    padded = torch.arange(L) >= torch.tensor([8, 3, 5]).unsqueeze(1)
    kpm = torch.zeros(N, L).masked_fill(padded, float("-inf"))  # float, as the mask (no mixed-type warning)
    bias = torch.randn(L, L) if mask == "2d" else torch.randn(N * 2, L, L)
    bias.requires_grad_()
    results = []
    for module in (ours, ref):
        out, w = module(x, x, x, key_padding_mask=kpm, attn_mask=bias, need_weights=need_weights)
        loss = out.square().sum() + (w.square().sum() if need_weights else 0)
        results.append((out, *torch.autograd.grad(loss, (bias, *module.parameters()))))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_is_causal_hint(device):
    ref, ours = pair(device, embed_dim=8, num_heads=2, batch_first=True)
    x = torch.randn(2, 5, 8, device=device)
    causal = nn.Transformer.generate_square_subsequent_mask(5, device=device)
    check(ref, ours, [x, x, x], attn_mask=causal, is_causal=True, need_weights=False)


def test_unbatched(device):
    ref, ours = pair(device, embed_dim=8, num_heads=2)
    x = torch.randn(5, 8, device=device)
    pad = torch.tensor([False] * 4 + [True], device=device)
    for need_weights, average in [(False, True), (True, True), (True, False)]:
        check(ref, ours, [x, x, x], need_weights=need_weights, average_attn_weights=average)
        check(
            ref,
            ours,
            [x, x, x],
            key_padding_mask=pad,
            need_weights=need_weights,
            average_attn_weights=average,
        )


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("average", [False, True])
def test_weights_by_default(monkeypatch, batch_first, average):
    """need_weights=True (nn.MultiheadAttention's default) runs bigmodel's kernels: the output from
    the attention op, the weights from attention_weights (not nn.MultiheadAttention's path), equal
    to PyTorch's, with gradients through both; eval mode (PyTorch's fast path) too."""
    ref, ours = pair("cpu", embed_dim=32, num_heads=2, batch_first=batch_first)
    x = torch.randn(3, 70, 32) if batch_first else torch.randn(70, 3, 32)
    calls = []
    real = bigmodel.nn.attention.attention_weights
    monkeypatch.setattr(bigmodel.nn.attention, "attention_weights", lambda *a: calls.append(1) or real(*a))
    check(ref, ours, [x, x, x], average_attn_weights=average)
    assert calls
    ref.eval()
    ours.eval()
    with torch.no_grad():
        got, w = ours(x, x, x, average_attn_weights=average)
        want, w_ref = ref(x, x, x, average_attn_weights=average)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(w, w_ref, **TOL)


def test_weights_with_dropout_are_what_the_values_saw():
    """In training with dropout, the returned (per-head) weights carry the kernel's dropout, the same
    draw as the output's: the output is the weights times the value projection."""
    torch.manual_seed(0)
    ours = bigmodel.nn.MultiheadAttention(16, 2, dropout=0.3, batch_first=True)
    x = torch.randn(2, 40, 16)
    out, w = ours(x, x, x, average_attn_weights=False)
    v = torch.nn.functional.linear(x, *[t.chunk(3)[2] for t in (ours.in_proj_weight, ours.in_proj_bias)])
    heads = (w @ v.view(2, 40, 2, 8).transpose(1, 2)).transpose(1, 2).reshape(2, 40, 16)
    torch.testing.assert_close(out, ours.out_proj(heads), **TOL)
    assert (w == 0).float().mean() > 0.2


def test_slow_path_options(device):
    """add_bias_kv and add_zero_attn take nn.MultiheadAttention's path."""
    ref, ours = pair(device, embed_dim=8, num_heads=2, add_bias_kv=True, add_zero_attn=True)
    x = torch.randn(5, 2, 8, device=device)
    check(ref, ours, [x, x, x], need_weights=False)
    check(ref, ours, [x, x, x], average_attn_weights=False)


def test_training_dropout_uses_the_kernel(device):
    ref, ours = pair(device, embed_dim=8, num_heads=2, dropout=0.5)
    x = torch.randn(6, 2, 8, device=device)
    torch.manual_seed(1)
    a, _ = ours(x, x, x, need_weights=False)
    torch.manual_seed(1)
    b, _ = ours(x, x, x, need_weights=False)
    torch.testing.assert_close(a, b)
    ref.eval()
    ours.eval()
    assert not torch.allclose(a, ours(x, x, x, need_weights=False)[0])
    check(ref, ours, [x, x, x], need_weights=False)


def test_state_dict_round_trip():
    ours = bigmodel.nn.MultiheadAttention(8, 2, kdim=4, vdim=3)
    ref = nn.MultiheadAttention(8, 2, kdim=4, vdim=3)
    ref.load_state_dict(ours.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()


@pytest.mark.parametrize("kdim", [None, 12])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "f.linear"])
def test_projections_match_native(monkeypatch, kdim, batch_first, bias, onednn):
    """The projections run on oneDNN's GEMM (where torch has it, from _ONEDNN_MIN_MACS multiply-adds,
    here forced either way; its backward gives the input gradient there too): nn.MultiheadAttention's
    output and gradients within float32 tolerance, with packed and separate projection weights, either
    layout (non-contiguous projection inputs), with and without bias, with and without autograd."""
    monkeypatch.setattr(bigmodel.nn.attention, "_ONEDNN_MIN_MACS", 0 if onednn else 1 << 62)
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, kdim=kdim, vdim=kdim, bias=bias, batch_first=batch_first)
    ours = bigmodel.nn.MultiheadAttention(16, 4, kdim=kdim, vdim=kdim, bias=bias, batch_first=batch_first)
    ours.load_state_dict(ref.state_dict())
    q = torch.randn(3, 7, 16)
    kv = torch.randn(3, 9, kdim or 16)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)  # (L, N, E) views: strided rows
    with torch.no_grad():
        got, _ = ours(q, *((kv, kv) if kdim else (q, q)), need_weights=False)
        want, _ = ref(q, *((kv, kv) if kdim else (q, q)), need_weights=False)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    check(ref, ours, [q, kv, kv] if kdim else [q, q, q], need_weights=False)


@pytest.mark.parametrize("bf16_gemm", [True, False], ids=["bf16-gemm", "widened"])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_projections(monkeypatch, bf16_gemm, bias):
    """A bf16 layer's projections where the CPU has no bf16 GEMM multiply in float32 and round to bf16
    (forced either way here): output, parameter and input gradients in bf16, within bf16 rounding of
    the float32 layer on the same bf16 values, as native's bf16 layer is."""
    monkeypatch.setattr(bigmodel.nn.attention, "_cpu_bf16_gemm", lambda: bf16_gemm)
    torch.manual_seed(0)
    wide = nn.MultiheadAttention(32, 4, bias=bias, batch_first=True)
    ours = bigmodel.nn.MultiheadAttention(32, 4, bias=bias, batch_first=True).to(torch.bfloat16)
    ours.load_state_dict(wide.state_dict())
    wide.load_state_dict(ours.state_dict())  # the bf16-rounded weights, in float32
    x = torch.randn(3, 11, 32).to(torch.bfloat16).requires_grad_()
    xw = x.detach().float().requires_grad_()
    got, _ = ours(x, x, x, need_weights=False)
    want, _ = wide(xw, xw, xw, need_weights=False)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
    got.float().sum().backward()
    want.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), xw.grad, atol=5e-2, rtol=5e-2)
    for p, pw in zip(ours.parameters(), wide.parameters(), strict=True):
        assert p.grad.dtype == torch.bfloat16
        torch.testing.assert_close(p.grad.float(), pw.grad, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("need_weights", [False, True])
def test_compiled_matches_eager(need_weights):
    """Under torch.compile(fullgraph=True) (inductor): eager's output, weights and gradients."""
    torch._dynamo.reset()
    ours = bigmodel.nn.MultiheadAttention(16, 2, batch_first=True)
    compiled = torch.compile(ours, fullgraph=True, backend="inductor")
    x = torch.randn(3, 20, 16, requires_grad=True)
    pad = torch.arange(20) >= torch.tensor([20, 7, 13]).unsqueeze(1)
    got = compiled(x, x, x, key_padding_mask=pad, need_weights=need_weights)
    want = ours(x, x, x, key_padding_mask=pad, need_weights=need_weights)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    loss = [sum(t.square().sum() for t in r if t is not None) for r in (got, want)]
    for a, b in zip(*(torch.autograd.grad(v, [x, *ours.parameters()]) for v in loss), strict=True):
        torch.testing.assert_close(a, b, **TOL)
