"""bigmodel.nn.functional.scaled_dot_product_attention against F.scaled_dot_product_attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bigmodel.nn import functional as BF
from bigmodel.reference import attention_reference

pytestmark = pytest.mark.op("bigmodel::attention")


TOL = {"atol": 2e-5, "rtol": 1e-4}


def check(args, kwargs, bm_kwargs=None):
    args = [a.detach().requires_grad_() for a in args]
    out = BF.scaled_dot_product_attention(*args, **kwargs, **(bm_kwargs or {}))
    ref = F.scaled_dot_product_attention(*args, **kwargs)
    torch.testing.assert_close(out, ref, **TOL)
    seed = torch.randn_like(out)
    g = torch.autograd.grad((out * seed).sum(), args)
    gr = torch.autograd.grad((ref * seed).sum(), args)
    for a, b in zip(g, gr, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("shape", [(7, 8), (3, 7, 8), (2, 3, 7, 8), (2, 2, 3, 7, 8)], ids=str)
@pytest.mark.parametrize("is_causal", [False, True])
def test_any_rank(device, shape, is_causal):
    q = torch.randn(shape, device=device)
    k = torch.randn(*shape[:-2], 9, shape[-1], device=device)
    v = torch.randn(*shape[:-2], 9, 5, device=device)
    check((q, k, v), {"is_causal": is_causal})


@pytest.mark.parametrize("shape", [(3, 7, 8), (2, 2, 3, 7, 8)], ids=str)
def test_any_rank_with_mask(device, shape):
    q = torch.randn(shape, device=device)
    mask = torch.rand(7, 7, device=device) > 0.5
    mask.fill_diagonal_(True)
    check((q, q, q), {"attn_mask": mask})


def test_gqa_and_scale(device):
    q = torch.randn(2, 8, 33, 32, device=device)
    k = torch.randn(2, 2, 40, 32, device=device)
    v = torch.randn(2, 2, 40, 16, device=device)
    check((q, k, v), {"enable_gqa": True, "scale": 0.25, "is_causal": True})
    with pytest.raises(ValueError, match="enable_gqa=True"):
        BF.scaled_dot_product_attention(q, k, v)


def test_key_lengths_equal_padding_mask(device):
    q = torch.randn(3, 2, 17, 8, device=device)
    lengths = torch.tensor([17, 5, 1], device=device)
    mask = (torch.arange(17, device=device) < lengths.view(3, 1, 1, 1)).expand(3, 2, 17, 17)
    out = BF.scaled_dot_product_attention(q, q, q, key_lengths=lengths)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, attn_mask=mask), **TOL)


def test_fully_masked_rows_are_zero(device):
    q = torch.randn(1, 1, 3, 8, device=device)
    mask = torch.tensor([[True, True, False], [False, False, False], [True, False, False]], device=device)
    out = BF.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert (out[0, 0, 1] == 0).all()
    assert torch.isfinite(out).all()


def test_dropout_draws_its_seed_from_torch(device):
    q = torch.randn(2, 2, 9, 8, device=device)
    torch.manual_seed(3)
    out = BF.scaled_dot_product_attention(q, q, q, dropout_p=0.5, is_causal=True)
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**31, ()))
    ref, _ = attention_reference(q, q, q, is_causal=True, dropout_p=0.5, seed=seed)
    torch.testing.assert_close(out, ref, **TOL)
    assert not torch.allclose(out, BF.scaled_dot_product_attention(q, q, q, is_causal=True))


@pytest.mark.parametrize(
    "shape,mask_shape",
    [
        ((3, 7, 8), (7, 7)),
        ((2, 3, 7, 8), (1, 3, 7, 7)),
        ((2, 3, 7, 8), (2, 1, 1, 7)),
        ((2, 2, 3, 7, 8), (2, 1, 3, 7, 7)),
    ],
    ids=str,
)
def test_learned_bias_gets_its_gradient(device, shape, mask_shape):
    """A float attn_mask that requires grad (T5 / Swin relative-position biases, learned ALiBi) gets
    the gradient PyTorch gives it, summed over the dimensions it broadcasts, at any rank (on CUDA
    through PyTorch's kernel)."""
    q, k, v = (torch.randn(shape, device=device, requires_grad=True) for _ in range(3))
    bias = torch.randn(mask_shape, device=device, requires_grad=True)
    out = BF.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(out, ref, **TOL)
    seed = torch.randn_like(out)
    g = torch.autograd.grad((out * seed).sum(), (q, k, v, bias))
    gr = torch.autograd.grad((ref * seed).sum(), (q, k, v, bias))
    for name, a, b in zip("qkvm", g, gr, strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=name)
    # Only the bias learns (q, k, v constants): the op still records its node.
    (gb,) = torch.autograd.grad(
        BF.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), attn_mask=bias).sum(), bias
    )
    (gbr,) = torch.autograd.grad(
        F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), attn_mask=bias).sum(), bias
    )
    torch.testing.assert_close(gb, gbr, **TOL)


def test_learned_bias_off_the_cpu_takes_pytorchs_kernel():
    """Off the CPU (where bigmodel has no kernel for a mask's gradient) a learned bias goes to
    F.scaled_dot_product_attention, key lengths folded into it: checked for shapes on the meta
    device (the CUDA case of the test above checks values)."""
    q, k, v = (torch.empty(2, 3, 7, 8, device="meta", requires_grad=True) for _ in range(3))
    bias = torch.empty(1, 3, 7, 7, device="meta", requires_grad=True)
    lengths = torch.tensor([7, 4], device="meta")
    out = BF.scaled_dot_product_attention(q, k, v, attn_mask=bias, key_lengths=lengths)
    assert out.shape == (2, 3, 7, 8) and out.requires_grad


def test_learned_bias_compiles():
    """A training step with a learned bias under torch.compile(fullgraph=True) equals eager."""
    q = torch.randn(2, 4, 33, 16, requires_grad=True)
    bias = torch.randn(1, 4, 33, 33, requires_grad=True)

    def f(q, bias):
        return BF.scaled_dot_product_attention(q, q, q, attn_mask=bias).square().sum()

    compiled = torch.compile(f, fullgraph=True)
    got = torch.autograd.grad(compiled(q, bias), (q, bias))
    want = torch.autograd.grad(f(q, bias), (q, bias))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_compile_fullgraph(device):
    q = torch.randn(2, 2, 9, 8, device=device, requires_grad=True)

    def f(q):
        return BF.scaled_dot_product_attention(q, q, q, is_causal=True).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q), f(q))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"attn_mask": torch.ones(4, 4, dtype=torch.bool), "is_causal": True},
            "either attn_mask or is_causal",
        ),
        ({"key_lengths": torch.tensor([4])}, "key_lengths needs 4-D inputs"),
    ],
)
def test_bad_arguments(kwargs, match):
    q = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match=match):
        BF.scaled_dot_product_attention(q, q, q, **kwargs)
