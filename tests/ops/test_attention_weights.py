"""torch.ops.bigmodel.attention_weights (the probabilities behind nn.MultiheadAttention's
need_weights) against bigmodel.reference and the attention op's own output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bigmodel.ops.attention import attention, attention_weights
from bigmodel.reference import attention_weights_reference

pytestmark = pytest.mark.op("bigmodel::attention_weights")

TOL = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-8},
    torch.float32: {"atol": 2e-6, "rtol": 1e-4},
    torch.bfloat16: {"atol": 8e-3, "rtol": 1.6e-2},
}


def qk(B, Hq, Hkv, Lq, Lk, d, *, dtype=torch.float32, requires_grad=True):
    q = torch.randn(B, Hq, Lq, d, dtype=dtype).requires_grad_(requires_grad)
    k = torch.randn(B, Hkv, Lk, d, dtype=dtype).requires_grad_(requires_grad)
    return q, k


def mask_of(kind, B, Hq, Lq, Lk, dtype):
    g = torch.Generator().manual_seed(3)
    if kind == "none":
        return None
    if kind == "bool":  # every row keeps key 0: no row without a key
        m = torch.rand(B, 1, Lq, Lk, generator=g) > 0.3
        m[..., 0] = True
        return m
    if kind == "bias":  # per batch and head, with -inf holes
        m = torch.randn(B, Hq, Lq, Lk, generator=g)
        return m.masked_fill(torch.rand(B, Hq, Lq, Lk, generator=g) < 0.2, float("-inf")).to(dtype)
    if kind == "key-bias":  # broadcast over rows
        return (-torch.arange(Lk).float() * torch.rand(1, Hq, 1, 1, generator=g)).to(dtype)
    if kind == "keys-strided":  # the key dim not contiguous: ATen's BLAS path
        return torch.randn(B, Hq, Lk, Lq, generator=g).transpose(-1, -2).to(dtype)
    raise AssertionError(kind)


def weights_and_reference(q, k, kw):
    """The op's weights (from the attention op's logsumexp) and the reference's, for the same call."""
    v = torch.zeros(q.shape[0], k.shape[1], k.shape[2], 1, dtype=q.dtype)
    average = kw.pop("average", False)
    _, lse = attention(q, k, v, **kw)
    return attention_weights(q, k, lse, **kw, average=average), attention_weights_reference(
        q, k, **kw, average=average
    )


# (B, Hq, Hkv, Lq, Lk, d): the register tiles (partial row groups and key blocks, GQA, d = 128 over two
# chunks of columns, d = 24 and 5 no multiples of 16); float64 and strided masks take ATen's BLAS path
SHAPES = [
    (2, 4, 2, 70, 150, 16),
    (1, 2, 2, 13, 100, 128),
    (2, 3, 1, 97, 67, 32),
    (3, 2, 2, 1, 300, 64),
    (2, 4, 2, 33, 129, 24),
    (1, 1, 1, 7, 5, 5),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}Hq{}Hkv{}Lq{}Lk{}d{}".format(*s))
@pytest.mark.parametrize("mask", ["none", "bool", "bias", "key-bias", "keys-strided"])
@pytest.mark.parametrize(
    "is_causal,use_lengths", [(False, False), (True, False), (False, True), (True, True)]
)
@pytest.mark.parametrize("average", [False, True])
def test_matches_reference(cpu_kernel, shape, mask, is_causal, use_lengths, average):
    """Weights and the gradients through them (float32) against the reference's, every masking, both
    layouts, on the tile kernels and ATen's BLAS path."""
    B, Hq, Hkv, Lq, Lk, d = shape
    q, k = qk(*shape)
    lengths = torch.randint(1, Lk + 1, (B,)) if use_lengths else None
    kw = {"attn_mask": mask_of(mask, B, Hq, Lq, Lk, q.dtype), "key_lengths": lengths, "is_causal": is_causal}
    w, ref = weights_and_reference(q, k, {**kw, "average": average})
    torch.testing.assert_close(w, ref, **TOL[torch.float32])
    seed = torch.randn_like(w)
    g = torch.autograd.grad((w * seed).sum(), (q, k))
    gr = torch.autograd.grad((ref * seed).sum(), (q, k))
    for a, b in zip(g, gr, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    "shape", SHAPES[:3] + SHAPES[4:5], ids=lambda s: "B{}Hq{}Hkv{}Lq{}Lk{}d{}".format(*s)
)
@pytest.mark.parametrize("average", [False, True])
def test_dtypes(cpu_kernel, dtype, shape, average):
    q, k = qk(*shape, dtype=dtype, requires_grad=False)
    w, ref = weights_and_reference(q, k, {"is_causal": True, "average": average})
    assert w.dtype == dtype
    torch.testing.assert_close(w, ref, **TOL[dtype])


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4]], ids=["d16", "d24"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("average", [False, True])
def test_dropout(cpu_kernel, shape, is_causal, average):
    """With dropout the weights are what the values were multiplied by: the reference's (same hash),
    and weights @ v is the attention's output."""
    B, Hq, Hkv, Lq, Lk, d = shape
    q, k = qk(*shape, requires_grad=False)
    v = torch.randn(B, Hkv, Lk, 8)
    kw = {"key_lengths": torch.randint(1, Lk + 1, (B,)), "is_causal": is_causal, "dropout_p": 0.3, "seed": 11}
    out, lse = attention(q, k, v, **kw)
    w = attention_weights(q, k, lse, **kw)
    torch.testing.assert_close(w, attention_weights_reference(q, k, **kw), **TOL[torch.float32])
    assert (w == 0).float().mean() > 0.25  # dropped, beside the masked ones
    torch.testing.assert_close(w @ v.repeat_interleave(Hq // Hkv, dim=1), out, atol=2e-5, rtol=1e-4)
    avg = attention_weights(q, k, lse, **kw, average=True)
    torch.testing.assert_close(avg, w.mean(dim=1), **TOL[torch.float32])


def test_rows_without_keys_are_zero(cpu_kernel):
    q, k = qk(2, 2, 2, 9, 70, 16, requires_grad=False)
    v = torch.randn(2, 2, 70, 16)
    lengths = torch.tensor([0, 70])
    mask = torch.zeros(9, 70)
    mask[4] = float("-inf")
    out, lse = attention(q, k, v, attn_mask=mask, key_lengths=lengths)
    w = attention_weights(q, k, lse, attn_mask=mask, key_lengths=lengths)
    assert torch.equal(w[0], torch.zeros_like(w[0]))
    assert torch.equal(w[1, :, 4], torch.zeros_like(w[1, :, 4]))
    torch.testing.assert_close(w[1].sum(-1)[:, [0, 1, 2, 3, 5, 6, 7, 8]], torch.ones(2, 8))


@pytest.mark.parametrize("d", [16, 5])
@pytest.mark.parametrize("is_causal", [False, True])
def test_nan_row_is_nan(cpu_kernel, d, is_causal):
    """A row with a NaN score is NaN throughout (its masked keys too), as PyTorch's softmax gives;
    averaged, the row of every head's mean."""
    q, k = qk(2, 2, 2, 8, 70, d, requires_grad=False)
    q[0, 1, 3, 0] = float("nan")
    kw = {"is_causal": is_causal, "key_lengths": torch.tensor([50, 70])}
    _, lse = attention(q, k, torch.randn(2, 2, 70, 4), **kw)
    w = attention_weights(q, k, lse, **kw)
    assert w[0, 1, 3].isnan().all()
    assert w.isnan().sum() == 70
    avg = attention_weights(q, k, lse, **kw, average=True)
    assert avg[0, 3].isnan().all() and avg.isnan().sum() == 70


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4]], ids=["d16", "d24"])
def test_masked_keys_are_exactly_zero(cpu_kernel, shape):
    """Keys a mask excludes (-inf, or False) get weight 0, not exp's smallest value."""
    B, Hq, Hkv, Lq, Lk, d = shape
    q, k = qk(*shape, requires_grad=False)
    for kind in ("bias", "bool"):
        mask = mask_of(kind, B, Hq, Lq, Lk, q.dtype)
        _, lse = attention(q, k, torch.randn(B, Hkv, Lk, 4), attn_mask=mask)
        w = attention_weights(q, k, lse, attn_mask=mask)
        excluded = (~mask if kind == "bool" else mask == float("-inf")).expand_as(w)
        assert excluded.any() and (w[excluded] == 0).all()


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_gradcheck(average, dropout_p):
    """float64 gradients (and second derivatives) through the weights, logsumexp taken from the
    attention op with the same arguments as it is in nn.MultiheadAttention."""
    q, k = qk(2, 4, 2, 5, 7, 3, dtype=torch.float64)
    v = torch.randn(2, 2, 7, 2, dtype=torch.float64)
    lengths = torch.tensor([7, 3])
    mask = torch.randn(1, 4, 5, 7, dtype=torch.float64)

    def f(q, k):
        kw = {"attn_mask": mask, "key_lengths": lengths, "dropout_p": dropout_p, "seed": 2}
        _, lse = attention(q, k, v, **kw)
        return attention_weights(q, k, lse, **kw, average=average)

    torch.autograd.gradcheck(f, (q, k))
    torch.autograd.gradgradcheck(f, (q, k))


@pytest.mark.parametrize("extras", ["none", "mask+lengths", "causal+dropout"])
@pytest.mark.parametrize("average", [False, True])
def test_opcheck(extras, average):
    q, k = qk(2, 4, 2, 5, 6, 16)
    mask = torch.rand(2, 1, 5, 6) > 0.2 if extras == "mask+lengths" else None
    lengths = torch.tensor([6, 3]) if extras == "mask+lengths" else None
    causal, p = extras == "causal+dropout", 0.3 if extras == "causal+dropout" else 0.0
    _, lse = attention(q, k, torch.randn(2, 2, 6, 4), mask, lengths, causal, None, p, 9)
    args = (q, k, lse, mask, lengths, causal, None, p, 9, average)
    torch.library.opcheck(torch.ops.bigmodel.attention_weights.default, args)


def test_compile_fullgraph():
    q, k = qk(2, 2, 2, 9, 9, 16)
    v = torch.randn(2, 2, 9, 16)

    def f(q, k):
        out, lse = attention(q * 2, k, v, is_causal=True)
        return out.sum() + attention_weights(q * 2, k, lse, is_causal=True, average=True).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k), f(q, k))
    for a, b in zip(
        torch.autograd.grad(compiled(q, k), (q, k)), torch.autograd.grad(f(q, k), (q, k)), strict=True
    ):
        torch.testing.assert_close(a, b)


BAD = [
    (lambda q, k, lse: (q, k, lse[:, :, :3]), {}, "logsumexp must have shape \\[2, 4, 5\\]"),
    (lambda q, k, lse: (q, k, lse.double()), {}, "logsumexp must be Float"),
    (lambda q, k, lse: (q, k[..., :4], lse), {}, "key has head dim"),
    (lambda q, k, lse: (q, k.double(), lse), {}, "key has dtype"),
    (lambda q, k, lse: (q, k, lse), {"attn_mask": torch.ones(5, 5, dtype=torch.bool)}, "attn_mask must be"),
    (lambda q, k, lse: (q, k, lse), {"key_lengths": torch.tensor([1, 7])}, "key_lengths must lie"),
    (lambda q, k, lse: (q, k, lse), {"dropout_p": -0.1}, "dropout_p must be in"),
]


@pytest.mark.parametrize("make,kwargs,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_inputs(make, kwargs, match):
    q, k = qk(2, 4, 2, 5, 6, 8, requires_grad=False)
    lse = torch.zeros(2, 4, 5)
    with pytest.raises(RuntimeError, match="bigmodel.attention_weights: " + match):
        attention_weights(*make(q, k, lse), **kwargs)


def test_matches_native_softmax():
    """Without masks, dropout or GQA: softmax(q k^T / sqrt(d)), as PyTorch computes it."""
    q, k = qk(2, 3, 3, 40, 50, 32, requires_grad=False)
    _, lse = attention(q, k, torch.randn(2, 3, 50, 8))
    want = F.softmax(q @ k.transpose(-2, -1) / 32**0.5, dim=-1)
    torch.testing.assert_close(attention_weights(q, k, lse), want, **TOL[torch.float32])
