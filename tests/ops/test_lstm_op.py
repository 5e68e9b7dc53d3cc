"""torch.ops.bigmodel.lstm_layer against bigmodel.reference, gradcheck and opcheck."""

from __future__ import annotations

import itertools

import pytest
import torch

from bigmodel.ops.lstm import lstm_layer
from bigmodel.reference import lstm_layer_reference

# (T, B, I, H, P): P = 0 means no projection is possible (H = 1).
SIZES = [(1, 1, 1, 1, 0), (13, 3, 4, 5, 3), (13, 7, 6, 33, 7), (2, 3, 1, 1, 0)]
FLAGS = list(itertools.product([False, True], repeat=4))  # has_lengths, reverse, proj, bias
TOL = {torch.float64: {"atol": 1e-12, "rtol": 1e-10}, torch.float32: {"atol": 1e-5, "rtol": 1e-4}}


def make_args(T, B, IN, H, P, *, proj, bias, has_lengths, dtype, device, requires_grad=True):
    """Random op arguments (weights scaled like nn.LSTM's init); lengths cover 1 and T when B > 1."""
    proj = proj and P > 0
    Pout = P if proj else H
    k = H**-0.5

    def rand(*shape, scale=1.0):
        t = (torch.rand(shape, dtype=torch.float64) * 2 - 1) * scale
        return t.to(dtype=dtype, device=device).requires_grad_(requires_grad)

    args = [
        rand(T, B, IN),
        rand(B, Pout),
        rand(B, H),
        rand(4 * H, IN, scale=k),
        rand(4 * H, Pout, scale=k),
        rand(4 * H, scale=k) if bias else None,
        rand(4 * H, scale=k) if bias else None,
        rand(Pout, H, scale=k) if proj else None,
    ]
    lengths = None
    if has_lengths:
        lengths = torch.randint(1, T + 1, (B,))
        if B > 1:
            lengths[0], lengths[-1] = 1, T
        lengths = lengths.to(device)
    return args, lengths


def grads(outputs, inputs, seed_grads):
    loss = sum((o * g).sum() for o, g in zip(outputs, seed_grads, strict=True))
    present = [t for t in inputs if t is not None]
    return torch.autograd.grad(loss, present)


def outputs_and_grads(args, lengths, reverse, threads):
    """lstm_layer's outputs, random seed gradients for them, and the input gradients, on `threads`
    threads."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = lstm_layer(*args, lengths=lengths, reverse=reverse)
        seed_grads = [torch.randn_like(o) for o in out]
        return out, seed_grads, grads(out, args, seed_grads)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "T{}B{}I{}H{}P{}".format(*s))
@pytest.mark.parametrize("has_lengths,reverse,proj,bias", FLAGS)
def test_matches_reference(device, cpu_kernel, dtype, size, has_lengths, reverse, proj, bias):
    args, lengths = make_args(
        *size, proj=proj, bias=bias, has_lengths=has_lengths, dtype=dtype, device=device
    )
    out = lstm_layer(*args, lengths=lengths, reverse=reverse)
    ref = lstm_layer_reference(*args, lengths=lengths, reverse=reverse)
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r, **TOL[dtype])
    if has_lengths:
        T = size[0]
        past_end = torch.arange(T, device=device).unsqueeze(1) >= lengths.unsqueeze(0)
        assert (out[0][past_end] == 0).all()

    seed_grads = [torch.randn_like(o) for o in out]
    for g, gr in zip(grads(out, args, seed_grads), grads(ref, args, seed_grads), strict=True):
        torch.testing.assert_close(g, gr, **TOL[dtype])


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    "T,B,IN,H",
    [
        (9, 1, 10, 37),
        (9, 7, 10, 37),
        (9, 8, 10, 37),
        (9, 14, 10, 37),
        (9, 16, 10, 37),
        (9, 29, 10, 37),
        (9, 64, 10, 37),
        (3, 40, 300, 300),
        (40, 48, 10, 37),
    ],
    ids=["B1", "B7", "B8", "B14", "B16", "B29", "B64", "weights-past-L2", "fused-weight-grads"],
)
@pytest.mark.parametrize("reverse", [False, True])
def test_work_splits_match_reference(cpu_kernel, threads, T, B, IN, H, reverse):
    """The CPU time loop splits batch rows (no synchronisation) or, for small batches and for
    weights larger than a core's L2, hidden units (one barrier per step) over threads: every split
    gives the reference's outputs and gradients, with lengths. B = 14, 16 on two threads: the forward
    takes column groups (two row groups would run 4-row blocks), the backward row groups (column
    groups on the AVX2 kernels, for the same reason). The float32
    AVX-512 forward runs blocks of 7 and 8 rows as two-pass tall tiles: B = 7, 8 in one block (column
    groups on two threads; the lengths shrink it to short tiles), B = 14 in one block per row group
    on two threads; so do the backward's [dh, dx] tiles (B = 14 on two threads, B = 8 and 14 on one).
    Row groups fuse
    the weight gradients into the loop from 512 packed rows on (the last case: ~980 rows); column
    groups leave dx to one GEMM after the loop."""
    args, lengths = make_args(
        T, B, IN, H, 0, proj=False, bias=True, has_lengths=True, dtype=torch.float32, device="cpu"
    )
    out, seed_grads, got = outputs_and_grads(args, lengths, reverse, threads)
    ref = lstm_layer_reference(*args, lengths=lengths, reverse=reverse)
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r, **TOL[torch.float32])
    for g, gr in zip(got, grads(ref, args, seed_grads), strict=True):
        torch.testing.assert_close(g, gr, **TOL[torch.float32])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("input_gemm", ["on", "off"])
@pytest.mark.parametrize("B", [1, 2, 3, 4])
@pytest.mark.parametrize("T,IN,H", [(4, 32, 32), (3, 48, 64), (5, 10, 37)], ids=["F64", "F112", "F47"])
def test_few_rows_match_reference(cpu_kernel, monkeypatch, threads, input_gemm, B, T, IN, H):
    """Blocks of one to three rows multiply several 16-column strips per K pass (four at one row:
    both halves of a forward panel, a whole backward panel; two at two or three rows), falling back
    to fewer where a panel has fewer (H = 37: a last panel of 5 units; F = H + IN = 47: a backward
    panel of three quarters). Without lengths every step runs the batch's own block size."""
    monkeypatch.setenv("BIGMODEL_LSTM_INPUT_GEMM", input_gemm)
    args, _ = make_args(
        T, B, IN, H, 0, proj=False, bias=True, has_lengths=False, dtype=torch.float32, device="cpu"
    )
    out, seed_grads, got = outputs_and_grads(args, None, False, threads)
    ref = lstm_layer_reference(*args)
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r, **TOL[torch.float32])
    for g, gr in zip(got, grads(ref, args, seed_grads), strict=True):
        torch.testing.assert_close(g, gr, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "T,B,IN,H",
    [(9, 1, 10, 37), (9, 16, 10, 37), (9, 64, 100, 200), (3, 40, 300, 300), (40, 48, 10, 37), (1, 5, 20, 37)],
    ids=["B1", "B16", "seed-like", "weights-past-L2", "fused-weight-grads", "one-step"],
)
def test_input_without_grad(cpu_kernel, dtype, threads, T, B, IN, H):
    """An input that needs no gradient (raw features, a frozen embedding): the backward forms no dx
    (the [dh, dx] tiles skip dx's panels; column groups skip the GEMM after the loop) and every other
    gradient equals the one computed beside dx, bit for bit, on every kernel set and work split."""
    args, lengths = make_args(
        T, B, IN, H, 0, proj=False, bias=True, has_lengths=B > 1, dtype=dtype, device="cpu"
    )
    _, seed_grads, want = outputs_and_grads(args, lengths, False, threads)
    args[0] = args[0].detach()
    torch.set_num_threads(threads)  # restored by conftest's _keep_threads
    got = grads(lstm_layer(*args, lengths=lengths), args[1:], seed_grads)
    for g, w in zip(got, want[1:], strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("used", ["output", "h_n", "c_n", "h_n+c_n"])
def test_gradient_of_some_outputs(device, used):
    """Outputs that do not reach the loss get no gradient (None) in backward; that must mean zero."""
    args, lengths = make_args(
        5, 3, 4, 5, 3, proj=True, bias=True, has_lengths=True, dtype=torch.float64, device=device
    )
    names = ["output", "h_n", "c_n"]
    out = lstm_layer(*args, lengths=lengths, reverse=True)
    ref = lstm_layer_reference(*args, lengths=lengths, reverse=True)
    pick = [names.index(n) for n in used.split("+")]
    loss, loss_ref = sum(out[i].sum() for i in pick), sum(ref[i].sum() for i in pick)
    present = [t for t in args if t is not None]
    for g, gr in zip(torch.autograd.grad(loss, present), torch.autograd.grad(loss_ref, present), strict=True):
        torch.testing.assert_close(g, gr, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_computes_in_float32(device, dtype):
    """bf16/fp16 in, fp32 inside: the result is the float32 reference rounded once (plus GEMM order)."""
    args, lengths = make_args(
        13,
        7,
        6,
        33,
        7,
        proj=True,
        bias=True,
        has_lengths=True,
        dtype=dtype,
        device=device,
        requires_grad=False,
    )
    out = lstm_layer(*args, lengths=lengths)
    ref = lstm_layer_reference(*[a.double() if a is not None else None for a in args], lengths=lengths)
    eps = torch.finfo(dtype).eps
    for o, r in zip(out, ref, strict=True):
        assert o.dtype == dtype
        torch.testing.assert_close(o.double(), r, atol=4 * eps, rtol=4 * eps)


@pytest.mark.parametrize("has_lengths,reverse,proj,bias", FLAGS)
def test_gradcheck(device, has_lengths, reverse, proj, bias):
    args, lengths = make_args(
        4, 3, 2, 3, 2, proj=proj, bias=bias, has_lengths=has_lengths, dtype=torch.float64, device=device
    )

    def fn(*a):
        return lstm_layer(*a, lengths=lengths, reverse=reverse)

    assert torch.autograd.gradcheck(fn, tuple(args), eps=1e-6, atol=1e-7, rtol=1e-5)


OPCHECK_CASES = {
    "plain": dict(has_lengths=False, reverse=False, proj=False, bias=True, train=True),
    "single-step": dict(has_lengths=False, reverse=False, proj=False, bias=True, train=True, T=1),
    "single-step-inference": dict(has_lengths=False, reverse=False, proj=False, bias=False, train=False, T=1),
    "lengths-reverse": dict(has_lengths=True, reverse=True, proj=False, bias=True, train=True),
    "proj-lengths-nobias": dict(has_lengths=True, reverse=False, proj=True, bias=False, train=True),
    "inference": dict(has_lengths=True, reverse=True, proj=True, bias=True, train=False),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(device, case):
    c = OPCHECK_CASES[case]
    args, lengths = make_args(
        c.get("T", 5),
        3,
        4,
        5,
        3,
        proj=c["proj"],
        bias=c["bias"],
        has_lengths=c["has_lengths"],
        dtype=torch.float32,
        device=device,
        requires_grad=c["train"],
    )
    torch.library.opcheck(torch.ops.bigmodel.lstm_layer.default, (*args, lengths, c["reverse"], c["train"]))


@pytest.mark.parametrize("input_grad", [True, False], ids=["", "no-input-grad"])
@pytest.mark.parametrize("single_step", [False, True], ids=["layer", "single-step"])
def test_opcheck_backward(device, single_step, input_grad):
    args, lengths = make_args(
        1 if single_step else 5,
        3,
        4,
        5,
        3,
        proj=not single_step,
        bias=True,
        has_lengths=not single_step,
        dtype=torch.float32,
        device=device,
        requires_grad=False,
    )
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = args
    out, h_n, c_n, gates, cells = torch.ops.bigmodel.lstm_layer(*args, lengths, True, True)
    backward_args = (torch.randn_like(out), torch.randn_like(h_n), None, x, h0, c0, w_ih, w_hh, w_hr, lengths)
    backward_args += (out, gates, cells, True, True, input_grad)
    torch.library.opcheck(torch.ops.bigmodel.lstm_layer_backward.default, backward_args)
    if not input_grad:  # no input gradient: an empty tensor in its place
        assert torch.ops.bigmodel.lstm_layer_backward(*backward_args)[0].shape == (0,)


@pytest.mark.parametrize("proj", [False, True], ids=["tiles", "proj"])
def test_bfloat16_layer_saves_bf16_gates(cpu_kernel, proj):
    """A bf16 layer on the CPU saves its gates and cells as bf16 (csrc/lstm/lstm.h) on every kernel
    set and path: the bf16 tiles and AMX write them so, the portable path (projections, AVX2-only
    CPUs) converts. opcheck holds the fake kernel to it, forward and backward; a backward handed
    float32 ones says what it expects."""
    args, lengths = make_args(
        6,
        5,
        4,
        9,
        3,
        proj=proj,
        bias=True,
        has_lengths=True,
        dtype=torch.bfloat16,
        device="cpu",
        requires_grad=False,
    )
    out, h_n, c_n, gates, cells = torch.ops.bigmodel.lstm_layer(*args, lengths, False, True)
    assert gates.dtype == cells.dtype == torch.bfloat16
    torch.library.opcheck(torch.ops.bigmodel.lstm_layer.default, (*args, lengths, False, True))
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = args
    grads = (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n))
    backward_args = (*grads, x, h0, c0, w_ih, w_hh, w_hr, lengths, out)
    torch.library.opcheck(
        torch.ops.bigmodel.lstm_layer_backward.default, (*backward_args, gates, cells, False, True)
    )
    with pytest.raises(RuntimeError, match="gates/cells must have dtype BFloat16, got Float and Float"):
        torch.ops.bigmodel.lstm_layer_backward(*backward_args, gates.float(), cells.float(), False, True)


def bf16_layer_args(T, B, IN, H):
    """A bf16 layer's op arguments with bias, no projection, lengths where B > 1, no gradients."""
    return make_args(
        T,
        B,
        IN,
        H,
        0,
        proj=False,
        bias=True,
        has_lengths=B > 1,
        dtype=torch.bfloat16,
        device="cpu",
        requires_grad=False,
    )


@pytest.mark.parametrize("H", [40, 21])
@pytest.mark.parametrize("B", [1, 5, 8, 64])
@pytest.mark.parametrize("kernel", ["avx512-fp32", "avx2"])
def test_bfloat16_on_float32_tiles_is_the_float32_layer_rounded(monkeypatch, kernel, B, H):
    """A bf16 layer on the float32 FMA tiles (BIGMODEL_CPU_KERNEL=avx512-fp32; 'auto' where vdpbf16ps
    does not pay, or without AVX512-BF16; the AVX2 tiles on a CPU without AVX-512) computes exactly what
    the float32 layer computes on the same bf16 values and rounds its output and saved gates and cells
    to nearest even, as Tensor.to(torch.bfloat16) does: bit for bit, NaN rows included (H = 21: a last
    group of 5 hidden units, stored through lane masks)."""
    if torch.ops.bigmodel.build_info().find(f"cpu_{kernel.split('-')[0]}=1") < 0:
        pytest.skip(f"this CPU (or build) has no {kernel} kernels")
    monkeypatch.setenv("BIGMODEL_CPU_KERNEL", kernel)
    args, lengths = bf16_layer_args(9, B, 100, H)
    args[0][2, B - 1, 3] = float("nan")  # the last row (length T) goes NaN from step 2 on
    wide = torch.ops.bigmodel.lstm_layer(*args, lengths, False, True)
    f32_args = [a.float() if a is not None else None for a in args]
    ref = torch.ops.bigmodel.lstm_layer(*f32_args, lengths, False, True)
    for name, w, r in zip(("output", "h_n", "c_n", "gates", "cells"), wide, ref, strict=True):
        assert w.dtype == torch.bfloat16, name
        r = r.to(torch.bfloat16)
        assert torch.equal(w.view(torch.int16), r.view(torch.int16)) or (
            torch.equal(w.isnan(), r.isnan()) and torch.equal(w[~w.isnan()], r[~r.isnan()])
        ), name
    assert wide[0][2:, B - 1].isnan().all() and not wide[0][:, : B - 1].isnan().any()


@pytest.mark.parametrize("H", [40, 21])
@pytest.mark.parametrize("B", [1, 5, 64])
def test_bfloat16_backward_on_avx2_reads_saved_bf16(monkeypatch, B, H):
    """The AVX2 backward reads a bf16 layer's saved gates and cells as bf16 in its pointwise pass: its
    gradients are, bit for bit, the float32 backward's on the same (bf16-valued) arguments and saved
    tensors, rounded to bf16."""
    if torch.ops.bigmodel.build_info().find("cpu_avx2=1") < 0:
        pytest.skip("this CPU (or build) has no AVX2 + FMA kernels")
    monkeypatch.setenv("BIGMODEL_CPU_KERNEL", "avx2")
    args, lengths = bf16_layer_args(7, B, 30, H)
    out, h_n, c_n, gates, cells = torch.ops.bigmodel.lstm_layer(*args, lengths, False, True)
    x, h0, c0, w_ih, w_hh, _, _, w_hr = args
    seeds = [torch.randn_like(t) for t in (out, h_n, c_n)]

    def backward(dtype, saved):
        a = [t.to(dtype) for t in (*seeds, x, h0, c0, w_ih, w_hh)]
        return torch.ops.bigmodel.lstm_layer_backward(
            *a, w_hr, lengths, out.to(dtype), *(t.to(saved) for t in (gates, cells)), False, True, True
        )

    got = backward(torch.bfloat16, torch.bfloat16)
    ref = backward(torch.float32, torch.float32)
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == torch.bfloat16
        assert torch.equal(g.view(torch.int16), r.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_nan_input_propagates_like_native(cpu_kernel, dtype):
    """A NaN in the input makes that sequence's later outputs NaN, as in nn.LSTM, on every kernel set:
    the gate nonlinearities must not clamp a NaN into a finite value (a diverged model has to show);
    and a huge finite input saturates them, as in nn.LSTM, instead of turning NaN."""
    torch.manual_seed(0)
    native = torch.nn.LSTM(8, 37).to(dtype)
    x = torch.randn(6, 4, 8, dtype=dtype)
    x[2, 1, 3] = float("nan")
    args = [x, torch.zeros(4, 37, dtype=dtype), torch.zeros(4, 37, dtype=dtype)]
    args += [
        p.detach() for p in (native.weight_ih_l0, native.weight_hh_l0, native.bias_ih_l0, native.bias_hh_l0)
    ]
    out, h_n, c_n = lstm_layer(*args, None)
    with torch.no_grad():
        ref, (ref_h, _) = native(x)
    assert torch.equal(out.isnan(), ref.isnan()) and out[2:, 1].isnan().all()
    assert torch.equal(h_n.isnan(), ref_h[0].isnan())
    ok = ~ref.isnan()
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(out[ok], ref[ok], **tol)
    # A huge finite input (a diverging model) saturates the gates as in nn.LSTM rather than giving NaN.
    x[2, 1, 3] = 1e30
    out, _, _ = lstm_layer(*args, None)
    with torch.no_grad():
        ref, _ = native(x)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, **tol)


@pytest.mark.parametrize("bad,match", [(0, r"lengths\[1\] = 0"), (6, r"lengths\[1\] = 6")])
def test_lengths_out_of_range(device, bad, match):
    args, _ = make_args(
        5, 3, 4, 5, 0, proj=False, bias=True, has_lengths=False, dtype=torch.float32, device=device
    )
    lengths = torch.tensor([5, bad, 2], device=device)
    with pytest.raises(RuntimeError, match=r"bigmodel\.lstm: lengths must lie in \[1, T=5\].*" + match):
        lstm_layer(*args, lengths=lengths)


def test_backward_without_train_raises(device):
    args, _ = make_args(
        3, 2, 4, 5, 0, proj=False, bias=True, has_lengths=False, dtype=torch.float32, device=device
    )
    out, _, _ = lstm_layer(*args, train=False)
    with pytest.raises(RuntimeError, match="train=False"):
        out.sum().backward()


def test_cpu_op_restores_floating_point_mode():
    """The op flushes denormals while it runs (a recurrent backward otherwise crawls through
    microcode assists) and must leave the caller's floating-point mode as it found it."""
    tiny = torch.full(
        (1 << 16,), 1e-39, dtype=torch.float32
    )  # denormal in float32, big enough to be parallel
    assert (tiny * 1.0).ne(0).all()
    args, lengths = make_args(
        7,
        3,
        4,
        5,
        0,
        proj=False,
        bias=True,
        has_lengths=True,
        dtype=torch.float32,
        device="cpu",
        requires_grad=True,
    )
    out, h_n, c_n = lstm_layer(*args, lengths, True)
    (out.sum() + h_n.sum()).backward()
    assert (tiny * 1.0).ne(0).all(), "denormals are flushed after the op: the caller's FP mode leaked"


@pytest.mark.parametrize("H", [7, 8, 15, 16, 24, 40])
@pytest.mark.parametrize("B", [4, 7])
def test_vector_tails_match_reference(cpu_kernel, H, B):
    """Hidden sizes on both sides of the kernels' vector widths (8 lanes on AVX2, 16 on AVX-512, half
    and whole 16-unit panels) and row counts that leave partial row blocks, forward and backward."""
    args, lengths = make_args(
        4, B, 9, H, 0, proj=False, bias=True, has_lengths=True, dtype=torch.float32, device="cpu"
    )
    out = lstm_layer(*args, lengths=lengths)
    ref = lstm_layer_reference(*args, lengths=lengths)
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r, **TOL[torch.float32])
    seed_grads = [torch.randn_like(o) for o in out]
    for g, gr in zip(grads(out, args, seed_grads), grads(ref, args, seed_grads), strict=True):
        torch.testing.assert_close(g, gr, **TOL[torch.float32])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize(
    "IN,H", [(1, 1), (9, 7), (33, 17), (60, 70)], ids=["I1H1", "I9H7", "I33H17", "I60H70"]
)
@pytest.mark.parametrize("bias,used", [(True, "all"), (False, "all"), (True, "h_n"), (True, "c_n")])
def test_single_steps_match_reference(cpu_kernel, threads, B, IN, H, bias, used):
    """One float32 step of up to eight rows (nn.LSTMCell at small batch) runs its own kernels, forward
    and backward, straight from the weights as stored; B = 9 is past them (tiles). Rows in groups of
    four (forward) and eight (backward), vector tails of x, h and the weight rows, one or two workers
    (I60H70 is large enough to split), and gradients of only some outputs."""
    args, _ = make_args(
        1, B, IN, H, 0, proj=False, bias=bias, has_lengths=False, dtype=torch.float32, device="cpu"
    )
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = lstm_layer(*args)
        keep = {"all": (0, 1, 2), "h_n": (1,), "c_n": (2,)}[used]
        seed_grads = [torch.randn_like(out[i]) for i in keep]
        got = grads([out[i] for i in keep], args, seed_grads)
        with torch.no_grad():
            inference = lstm_layer(*args)
    finally:
        torch.set_num_threads(saved)
    ref = lstm_layer_reference(*args)
    for o, i, r in zip(out, inference, ref, strict=True):
        torch.testing.assert_close(o, r, **TOL[torch.float32])
        torch.testing.assert_close(i, r, **TOL[torch.float32])
    for g, gr in zip(got, grads([ref[i] for i in keep], args, seed_grads), strict=True):
        torch.testing.assert_close(g, gr, **TOL[torch.float32])


@pytest.mark.parametrize(
    "variable,value,message",
    [
        (
            "BIGMODEL_CPU_KERNEL",
            "bogus",
            "BIGMODEL_CPU_KERNEL must be 'auto', 'avx512', 'avx512-fp32', 'avx2' or 'generic' "
            "\\(or unset\\), got 'bogus'",
        ),
        (
            "BIGMODEL_LSTM_INPUT_GEMM",
            "yes",
            "BIGMODEL_LSTM_INPUT_GEMM must be 'auto', 'on' or 'off', got 'yes'",
        ),
    ],
    ids=["cpu-kernel", "input-gemm"],
)
def test_bad_setting_is_a_clear_error(monkeypatch, variable, value, message):
    args, _ = make_args(
        3, 2, 4, 5, 0, proj=False, bias=True, has_lengths=False, dtype=torch.float32, device="cpu"
    )
    monkeypatch.setenv(variable, value)
    with pytest.raises(RuntimeError, match=message):
        lstm_layer(*args)


@pytest.mark.parametrize("mode", ["on", "off"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "bias,has_lengths,reverse", [(True, True, False), (False, False, True), (True, False, True)]
)
@pytest.mark.parametrize("H", [8, 21])
def test_input_gemm_matches_reference(cpu_kernel, monkeypatch, mode, threads, bias, has_lengths, reverse, H):
    """The forward with x W_ih^T + b taken from one GEMM before the time loop (the AVX2 loop's choice
    where [W_hh; W_ih] would not stay in its caches; BIGMODEL_LSTM_INPUT_GEMM=on forces it at small
    sizes) against the fused tiles and the reference: inference, training (its gates overwrite the
    GEMM's output in place) and backward, with lengths, reversed, one or two workers."""
    monkeypatch.setenv("BIGMODEL_LSTM_INPUT_GEMM", mode)
    args, lengths = make_args(
        6, 9, 13, H, 0, proj=False, bias=bias, has_lengths=has_lengths, dtype=torch.float32, device="cpu"
    )
    torch.set_num_threads(threads)  # (the autouse _keep_threads fixture restores it)
    out = lstm_layer(*args, lengths=lengths, reverse=reverse)
    with torch.no_grad():
        inference = lstm_layer(*args, lengths=lengths, reverse=reverse)
    seed_grads = [torch.randn_like(o) for o in out]
    got = grads(out, args, seed_grads)
    ref = lstm_layer_reference(*args, lengths=lengths, reverse=reverse)
    for o, i, r in zip(out, inference, ref, strict=True):
        torch.testing.assert_close(o, r, **TOL[torch.float32])
        torch.testing.assert_close(i, r, **TOL[torch.float32])
    for g, gr in zip(got, grads(ref, args, seed_grads), strict=True):
        torch.testing.assert_close(g, gr, **TOL[torch.float32])


def _cache_test_args(T, B, IN, H, dtype):
    """Arguments of one CPU call without lengths or gradients, for the packed-weight cache's tests."""
    args, _ = make_args(
        T,
        B,
        IN,
        H,
        0,
        proj=False,
        bias=True,
        has_lengths=False,
        dtype=dtype,
        device="cpu",
        requires_grad=False,
    )
    return args


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weight_cache_sees_every_update(cpu_kernel, dtype):
    """The CPU op caches its packed weights across calls; any change of their contents, including
    one through .data (which bumps no version counter) and a new tensor of the same shape, must
    give the new weights' result."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, _ = _cache_test_args(5, 8, 6, 9, dtype)

    def check():
        out = lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None)
        ref = lstm_layer_reference(*[a.double() for a in (x, h0, c0, w_ih, w_hh, b_ih, b_hh)], None)
        tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.05, rtol=0.05)
        for o, r in zip(out, ref, strict=True):
            torch.testing.assert_close(o.double(), r, **tol)

    check()
    w_hh.data.mul_(-1.5)  # no version bump
    check()
    w_ih.add_(0.25)
    check()
    w_hh = torch.flip(w_hh, [0]).contiguous()  # new tensor, same shape
    check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H", [9, 40])
def test_packed_weight_cache_sees_one_element(cpu_kernel, dtype, H):
    """The cache's digest of the weights notices a change of one element anywhere (first, last, an
    odd bf16 element that shares its 4-byte word, one past a 16-word block) and two elements
    swapped, each made through .data so that no version counter moves."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, _ = _cache_test_args(3, 8, 7, H, dtype)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.05, rtol=0.05)

    def check():
        ref = lstm_layer_reference(*[a.double() for a in (x, h0, c0, w_ih, w_hh, b_ih, b_hh)], None)
        for _ in range(2):  # the first call after a change, then a cache hit
            out = lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None)
            for o, r in zip(out[:3], ref[:3], strict=True):
                torch.testing.assert_close(o.double(), r, **tol)

    check()
    for w in (w_hh, w_ih):
        flat = w.data.view(-1)
        for i in (0, 1, 16, 17, flat.numel() // 2 + 1, flat.numel() - 1):
            flat[i] += 0.5
            check()
        a, b = flat.numel() // 3, flat.numel() // 3 + 32  # 32 elements: the same digest lane
        flat[a] += 1.0
        check()
        va, vb = flat[a].item(), flat[b].item()
        flat[a], flat[b] = vb, va
        check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [8, 70])
def test_packed_weight_cache_repacks_in_place(cpu_kernel, B, dtype):
    """Training steps whose weights an optimizer updates in place: each step's forward and backward
    re-pack into the previous step's panels (nothing else holds them), and every step's outputs and
    gradients match the float64 reference of that step's weights."""
    args, lengths = make_args(
        7, B, 6, 9, 0, proj=False, bias=True, has_lengths=True, dtype=dtype, device="cpu"
    )
    tol = TOL[torch.float32] if dtype == torch.float32 else dict(atol=0.05, rtol=0.05)
    params = args[3:7]
    for _ in range(3):
        out = lstm_layer(*args, lengths=lengths)
        seed_grads = [torch.randn_like(o) for o in out]
        ref_args = [
            a.detach().double().requires_grad_(a.requires_grad) if a is not None else None for a in args
        ]
        ref = lstm_layer_reference(*ref_args, lengths=lengths)
        for o, r in zip(out, ref, strict=True):
            torch.testing.assert_close(o.double(), r, **tol)
        got = grads(out, args, seed_grads)
        want = grads(ref, ref_args, [g.double() for g in seed_grads])
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.double(), w, **tol)
        with torch.no_grad():
            for w, g in zip(params, got[3:7], strict=True):
                w.sub_(0.1 * g)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B", [5, 20, 40, 70])
def test_bfloat16_row_blocks(cpu_kernel, threads, B):
    """bf16 layers run on AMX tiles (or AVX512-BF16) in 16- and 32-row blocks: every batch split
    stays within bf16 rounding of the float64 reference, with lengths."""
    args, lengths = make_args(
        6,
        B,
        10,
        37,
        0,
        proj=False,
        bias=True,
        has_lengths=True,
        dtype=torch.bfloat16,
        device="cpu",
        requires_grad=False,
    )
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = lstm_layer(*args, lengths=lengths)
    finally:
        torch.set_num_threads(saved)
    ref = lstm_layer_reference(*[a.double() if a is not None else None for a in args], lengths=lengths)
    for o, r in zip(out[:3], ref[:3], strict=True):
        torch.testing.assert_close(o.double(), r, atol=0.03, rtol=0.03)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(
    "T,B,IN,H", [(6, 5, 10, 37), (6, 40, 10, 37), (24, 20, 10, 37), (24, 70, 10, 37), (23, 67, 41, 70)]
)
def test_bfloat16_backward_row_blocks(cpu_kernel, threads, reverse, T, B, IN, H):
    """The bf16 backward (on AMX or vdpbf16ps: [dh, dx] tiles of dgates rounded to bf16, in 16- and
    32-row blocks on AMX, with the weight gradients fused in bf16 or left to BLAS) stays within bf16
    rounding of the float64 reference's gradients, with lengths. The last case has [h, x] over two
    panels, an odd batch and fused weight-gradient updates over odd row counts."""
    args, lengths = make_args(
        T, B, IN, H, 0, proj=False, bias=True, has_lengths=True, dtype=torch.bfloat16, device="cpu"
    )
    out, seed_grads, got = outputs_and_grads(args, lengths, reverse, threads)
    args64 = [a.detach().double().requires_grad_() if a is not None else None for a in args]
    ref = lstm_layer_reference(*args64, lengths=lengths, reverse=reverse)
    want = grads(ref, args64, [g.double() for g in seed_grads])
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.bfloat16
        scale = w.abs().max().item()
        assert (g.double() - w).abs().max().item() <= 0.02 * scale + 1e-3


def test_double_backward_raises(device):
    """A second backward through the LSTM's gradient is an error, not a silently constant gradient."""
    args, _ = make_args(
        3, 2, 4, 5, 0, proj=False, bias=True, has_lengths=False, dtype=torch.float32, device=device
    )
    out, _, _ = lstm_layer(*args)
    (g,) = torch.autograd.grad(out.sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError, match="gradient is not differentiable: double backward"):
        g.sum().backward()
