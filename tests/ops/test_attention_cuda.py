"""The CUDA attention kernels' own paths: tensor cores (bf16/fp16, d in {32, 64, 128}) forward and
backward against float64, dropout, CUDA graphs and torch.compile(mode="reduce-overhead").

The device-generic tests (tests/ops/test_attention_op.py, tests/nn/) also run on CUDA; they cover the
generic kernel (float32/float64, masks, any head dim). Everything here skips without a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bigmodel.ops.attention import attention
from bigmodel.reference import attention_reference, dropout_keep

pytestmark = [pytest.mark.op("bigmodel::attention"), pytest.mark.cuda]

# (B, Hq, Hkv, Lq, Lk): one partial block, several blocks with GQA, Lq != Lk both ways, length 1.
TC_SHAPES = [(2, 2, 2, 37, 37), (2, 4, 2, 130, 200), (1, 2, 1, 200, 67), (3, 1, 1, 1, 129)]


def qkv(B, Hq, Hkv, Lq, Lk, d, dtype):
    gen = torch.Generator(device="cuda").manual_seed(B * 1000 + Lq * 10 + d)

    def make(*shape):
        return (
            torch.randn(shape, device="cuda", dtype=torch.float32, generator=gen).to(dtype).requires_grad_()
        )

    return make(B, Hq, Lq, d), make(B, Hkv, Lk, d), make(B, Hkv, Lk, d)


def sdpa_mask(B, Lq, Lk, lengths, is_causal):
    mask = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device="cuda")
    if lengths is not None:
        mask &= torch.arange(Lk, device="cuda") < lengths.view(B, 1, 1, 1)
    if is_causal:
        mask &= torch.ones(Lq, Lk, dtype=torch.bool, device="cuda").tril()
    return mask


def outputs_and_grads(fn, q, k, v, grad):
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    return out, dq, dk, dv


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("shape", TC_SHAPES)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("use_lengths", [False, True])
def test_tensor_cores_within_twice_native_error(dtype, d, shape, is_causal, use_lengths):
    """Forward and all gradients within twice PyTorch's own error (F.sdpa in the same dtype) of the
    float64 result, with GQA, partial blocks, key lengths and the causal diagonal."""
    B, Hq, Hkv, Lq, Lk = shape
    q, k, v = qkv(B, Hq, Hkv, Lq, Lk, d, dtype)
    lengths = torch.randint(1, Lk + 1, (B,), device="cuda") if use_lengths else None
    mask = sdpa_mask(B, Lq, Lk, lengths, is_causal)
    grad = torch.randn(B, Hq, Lq, d, device="cuda").to(dtype)
    group = Hq // Hkv

    def native(q_, k_, v_):
        k_, v_ = k_.repeat_interleave(group, 1), v_.repeat_interleave(group, 1)
        return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask)

    def ours(q_, k_, v_):
        return attention(q_, k_, v_, key_lengths=lengths, is_causal=is_causal)[0]

    exact = outputs_and_grads(
        native, *(t.detach().double().requires_grad_() for t in (q, k, v)), grad.double()
    )
    theirs = outputs_and_grads(native, q, k, v, grad)
    mine = outputs_and_grads(ours, q, k, v, grad)
    ok = ~exact[0].isnan().any(-1, keepdim=True)  # rows with no visible key: PyTorch gives NaN
    for name, e, t, m in zip(("out", "dq", "dk", "dv"), exact, theirs, mine, strict=False):
        assert m.dtype == dtype and m.shape == e.shape, name
        sel = ok.expand_as(e) if name in ("out", "dq") else torch.ones_like(e, dtype=torch.bool)
        native_err = (t.double() - e)[sel].nan_to_num(0.0).abs().max()
        err = (m.double() - e)[sel].abs().max()
        assert err <= 2 * native_err + 1e-3, f"{name}: {err} vs PyTorch {native_err}"


@pytest.mark.parametrize("d", [32, 128])
@pytest.mark.parametrize("is_causal", [False, True])
def test_tensor_cores_dropout_matches_reference(d, is_causal):
    """Dropout on the tensor-core path draws the reference's mask (same hash of (seed, b, h, i, j))."""
    B, Hq, Hkv, Lq, Lk, p, seed = 2, 4, 2, 70, 150, 0.3, 1234
    q, k, v = qkv(B, Hq, Hkv, Lq, Lk, d, torch.bfloat16)
    lengths = torch.tensor([150, 77], device="cuda")
    grad = torch.randn(B, Hq, Lq, d, device="cuda").bfloat16()
    kw = dict(key_lengths=lengths, is_causal=is_causal, dropout_p=p, seed=seed)
    mine = outputs_and_grads(lambda *a: attention(*a, **kw)[0], q, k, v, grad)
    exact = outputs_and_grads(
        lambda *a: attention_reference(*a, **kw)[0],
        *(t.detach().double().requires_grad_() for t in (q, k, v)),
        grad.double(),
    )
    plain = outputs_and_grads(lambda *a: attention_reference(*a, **kw)[0], q, k, v, grad)  # bf16 reference
    for name, e, r, m in zip(("out", "dq", "dk", "dv"), exact, plain, mine, strict=False):
        ref_err = (r.double() - e).abs().max()
        assert (m.double() - e).abs().max() <= 2 * ref_err + 2e-2, name
    keep = dropout_keep(seed, B, Hq, Lq, Lk, p, device="cuda")
    assert 0.6 < keep.float().mean().item() < 0.8


def test_generic_and_tensor_core_paths_agree():
    """float16 on the tensor cores against float32 on the generic kernel, same inputs."""
    q, k, v = qkv(2, 4, 4, 100, 90, 64, torch.float16)
    lengths = torch.tensor([90, 31], device="cuda")
    fast, lse_fast = attention(q, k, v, key_lengths=lengths, is_causal=True)
    slow, lse_slow = attention(q.float(), k.float(), v.float(), key_lengths=lengths, is_causal=True)
    torch.testing.assert_close(fast.float(), slow, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(lse_fast, lse_slow, atol=2e-3, rtol=1e-3)


def test_unaligned_and_strided_operands():
    """A view whose rows are not 16-byte aligned is copied, not misread; strided heads are read in place."""
    base = torch.randn(2, 40, 3 * 4 * 64 + 1, device="cuda", dtype=torch.bfloat16)
    x = base[..., 1:].view(2, 40, 3, 4, 64)  # offset by one element: unaligned
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    out, _ = attention(q, k, v, is_causal=True)
    ref, _ = attention_reference(q.double(), k.double(), v.double(), is_causal=True)
    assert (out.double() - ref).abs().max() < 3e-2


def test_key_lengths_out_of_range_is_an_error():
    q, k, v = qkv(2, 2, 2, 8, 8, 32, torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"key_lengths must lie in \[0, Lk = 8\]"):
        attention(q, k, v, key_lengths=torch.tensor([3, 9], device="cuda"))


def test_cuda_graph_capture_and_replay():
    """Forward and backward capture into a CUDA graph (no host synchronization) and replay exactly."""
    q, k, v = qkv(2, 4, 2, 64, 96, 64, torch.bfloat16)
    lengths = torch.tensor([96, 50], device="cuda")
    grad = torch.randn(2, 4, 64, 64, device="cuda").bfloat16()

    def step():
        out = attention(q, k, v, key_lengths=lengths, is_causal=True)[0]
        return (out, *torch.autograd.grad(out, (q, k, v), grad))

    expected = step()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up on a side stream, as torch.cuda.graphs recommends
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for e, c in zip(expected, captured, strict=False):
        torch.testing.assert_close(c, e, atol=1e-2, rtol=1e-2)


def test_compile_reduce_overhead_fullgraph():
    q, k, v = qkv(2, 2, 2, 33, 33, 32, torch.float16)
    lengths = torch.tensor([33, 10], device="cuda")

    def f(q_, k_, v_):
        return attention(q_, k_, v_, key_lengths=lengths, is_causal=True)[0].float().square().sum()

    compiled = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # record, then replay the graph
        got = compiled(q, k, v)
    torch.testing.assert_close(got, f(q, k, v), atol=1e-3, rtol=1e-3)
