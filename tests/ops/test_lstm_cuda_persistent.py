"""The CUDA LSTM forward's two paths: the persistent kernel (small batches, one launch for every step)
and the per-step path, picked by BIGMODEL_CUDA_LSTM=auto|stepwise.

Both must give the reference's outputs and gradients, and in train mode the same gates/cells layout
(which backward reads), on shapes that do (B <= 64, H small) and do not (B = 65, H too large for
shared memory) qualify for the persistent kernel. CUDA only; skips cleanly without a GPU.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from test_lstm_op import TOL, make_args

from bigmodel.ops.lstm import lstm_layer
from bigmodel.reference import lstm_layer_reference

pytestmark = [pytest.mark.op("bigmodel::lstm_layer"), pytest.mark.cuda]

MODES = [pytest.param("auto", id="cuda-auto"), pytest.param("stepwise", id="cuda-stepwise")]
BATCHES = [1, 3, 7, 64, 65]  # 65: past the persistent kernel's batch limit
HIDDEN = [1, 5, 33, 200, 256]
T = 7


@pytest.fixture(params=MODES)
def mode(request, monkeypatch) -> str:
    monkeypatch.setenv("BIGMODEL_CUDA_LSTM", request.param)
    return request.param


def _cuda_args(T, B, I, H, *, has_lengths, dtype=torch.float32, requires_grad=True):  # noqa: E741
    """make_args for the layers these tests run: on CUDA, with bias, without projection."""
    return make_args(
        T,
        B,
        I,
        H,
        0,
        proj=False,
        bias=True,
        has_lengths=has_lengths,
        dtype=dtype,
        device="cuda",
        requires_grad=requires_grad,
    )


def _double_cpu(args):
    return [a.detach().double().cpu() if a is not None else None for a in args]


def _check_layer(B: int, H: int, steps: int, has_lengths: bool, reverse: bool) -> None:
    """Train-mode outputs and all gradients, and the inference outputs, against the float64 reference."""
    args, lengths = _cuda_args(steps, B, 6, H, has_lengths=has_lengths)
    lengths_cpu = lengths.cpu() if lengths is not None else None
    ref_args = [a.requires_grad_(True) if a is not None else None for a in _double_cpu(args)]
    ref = lstm_layer_reference(*ref_args, lengths=lengths_cpu, reverse=reverse)

    out = lstm_layer(*args, lengths=lengths, reverse=reverse)
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o.double().cpu(), r.detach(), **TOL[torch.float32])
    if has_lengths:
        past_end = torch.arange(steps, device="cuda").unsqueeze(1) >= lengths.unsqueeze(0)
        assert (out[0][past_end] == 0).all()

    seeds = [torch.randn(o.shape, dtype=torch.float64) for o in ref]
    loss = sum((o * s.to(o.device, o.dtype)).sum() for o, s in zip(out, seeds, strict=True))
    loss_ref = sum((r * s).sum() for r, s in zip(ref, seeds, strict=True))
    got = torch.autograd.grad(loss, [a for a in args if a is not None])
    want = torch.autograd.grad(loss_ref, [a for a in ref_args if a is not None])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double().cpu(), w, **TOL[torch.float32])

    with torch.no_grad():
        inf = torch.ops.bigmodel.lstm_layer(
            *[a.detach() if a is not None else None for a in args], lengths, reverse, False
        )
    for o, r in zip(inf[:3], ref, strict=True):
        torch.testing.assert_close(o.double().cpu(), r.detach(), **TOL[torch.float32])
    assert inf[3].numel() == 0 and inf[4].numel() == 0


@pytest.mark.parametrize("has_lengths,reverse", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("H", HIDDEN, ids=lambda h: f"H{h}")
@pytest.mark.parametrize("B", BATCHES, ids=lambda b: f"B{b}")
def test_matches_reference(mode, B, H, has_lengths, reverse):
    _check_layer(B, H, T, has_lengths, reverse)


@pytest.mark.parametrize("reverse", [False, True])
def test_hidden_too_large_for_shared_memory(mode, reverse):
    """B = 64, H = 1024: the staged h alone (64 x 1024 floats, 256 KiB) is more shared memory than a
    block of any current GPU gets, so auto falls back to the per-step path."""
    _check_layer(64, 1024, 3, True, reverse)


@pytest.mark.parametrize("reverse", [False, True])
def test_steps_that_no_sequence_reaches(mode, reverse):
    """Every length < T: the last steps (the first ones, in reverse) have no running row at all."""
    steps, B, H = 6, 3, 33
    args, _ = _cuda_args(steps, B, 4, H, has_lengths=False)
    lengths = torch.tensor([2, 4, 1], device="cuda")
    ref_args = [a.requires_grad_(True) if a is not None else None for a in _double_cpu(args)]
    ref = lstm_layer_reference(*ref_args, lengths=lengths.cpu(), reverse=reverse)
    out = lstm_layer(*args, lengths=lengths, reverse=reverse)
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o.double().cpu(), r.detach(), **TOL[torch.float32])
    seeds = [torch.randn(o.shape, dtype=torch.float64) for o in ref]
    loss = sum((o * s.to(o.device, o.dtype)).sum() for o, s in zip(out, seeds, strict=True))
    loss_ref = sum((r * s).sum() for r, s in zip(ref, seeds, strict=True))
    got = torch.autograd.grad(loss, [a for a in args if a is not None])
    want = torch.autograd.grad(loss_ref, [a for a in ref_args if a is not None])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double().cpu(), w, **TOL[torch.float32])


@pytest.mark.parametrize("has_lengths,reverse", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("B,H", [(1, 33), (7, 200), (64, 256)], ids=["B1H33", "B7H200", "B64H256"])
def test_train_workspace_matches_stepwise(monkeypatch, B, H, has_lengths, reverse):
    """gates/cells (what backward reads) come out in the same packed layout from both paths, padding
    rows past N included."""
    args, lengths = _cuda_args(T, B, 6, H, has_lengths=has_lengths, requires_grad=False)
    results = {}
    for m in ("auto", "stepwise"):
        monkeypatch.setenv("BIGMODEL_CUDA_LSTM", m)
        results[m] = torch.ops.bigmodel.lstm_layer(*args, lengths, reverse, True)
    for a, s in zip(results["auto"], results["stepwise"], strict=True):
        assert a.shape == s.shape and a.dtype == s.dtype
        torch.testing.assert_close(a, s, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["cuda-bfloat16", "cuda-float16"])
@pytest.mark.parametrize("has_lengths", [False, True])
def test_low_precision_computes_in_float32(mode, dtype, has_lengths):
    """bf16/fp16 in, fp32 inside, on the persistent kernel too: the float64 result rounded once."""
    args, lengths = _cuda_args(T, 7, 6, 33, has_lengths=has_lengths, dtype=dtype, requires_grad=False)
    out = lstm_layer(*args, lengths=lengths, reverse=True)
    ref = lstm_layer_reference(
        *_double_cpu(args), lengths=lengths.cpu() if lengths is not None else None, reverse=True
    )
    eps = torch.finfo(dtype).eps
    for o, r in zip(out, ref, strict=True):
        assert o.dtype == dtype
        torch.testing.assert_close(o.double().cpu(), r, atol=4 * eps, rtol=4 * eps)


def _kernel_names(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()]


@pytest.mark.parametrize(
    "B,H,expected",
    [(3, 5, True), (64, 33, True), (65, 33, False)],
    ids=["cuda-B3H5", "cuda-B64H33", "cuda-B65H33"],
)
def test_auto_picks_the_persistent_kernel(monkeypatch, B, H, expected):
    """auto runs the persistent kernel exactly where it qualifies; stepwise never does."""
    args, lengths = _cuda_args(T, B, 6, H, has_lengths=True, requires_grad=False)

    def run():
        torch.ops.bigmodel.lstm_layer(*args, lengths, False, True)

    run()  # first-call setup out of the profile
    monkeypatch.setenv("BIGMODEL_CUDA_LSTM", "auto")
    assert any("persistent_forward_kernel" in n for n in _kernel_names(run)) == expected
    monkeypatch.setenv("BIGMODEL_CUDA_LSTM", "stepwise")
    assert not any("persistent_forward_kernel" in n for n in _kernel_names(run))


def test_unknown_mode_is_a_clear_error(monkeypatch):
    args, _ = _cuda_args(3, 2, 4, 5, has_lengths=False, requires_grad=False)
    monkeypatch.setenv("BIGMODEL_CUDA_LSTM", "fast")
    with pytest.raises(RuntimeError, match="BIGMODEL_CUDA_LSTM must be 'auto' or 'stepwise', got 'fast'"):
        torch.ops.bigmodel.lstm_layer(*args, None, False, False)


@pytest.mark.parametrize("train", [False, True], ids=["cuda-inference", "cuda-train"])
def test_cuda_graph_capture(mode, train):
    """Without lengths nothing crosses between host and device, so a call can be captured in a CUDA
    graph and replayed on new input; the replay matches an eager call."""
    args, _ = _cuda_args(T, 3, 4, 33, has_lengths=False, requires_grad=False)

    def call():
        return torch.ops.bigmodel.lstm_layer(*args, None, True, train)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    args[0].copy_(torch.rand_like(args[0]) * 2 - 1)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, call(), strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float32])
