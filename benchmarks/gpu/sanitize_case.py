"""A small LSTM workload on CUDA for compute-sanitizer (memcheck, racecheck); run by run.sh.

Each case runs forward and backward through ``torch.ops.bigmodel.lstm_layer`` and
``torch.ops.bigmodel.lstm_layer_backward`` (through ``bigmodel.ops.lstm.lstm_layer`` and autograd),
plus an inference call (``train=False``), and compares them with ``bigmodel.reference`` in float64
on the CPU, so a kernel that writes out of bounds or races and still "runs" also fails here.
The cases are tiny: under memcheck every kernel runs tens of times slower.

Float32/bfloat16 cases without projection and with B <= 64 take the persistent forward kernel
(``BIGMODEL_CUDA_LSTM=auto``); the ``stepwise`` cases force the per-step forward on the same kinds of
shapes, so both forward paths run under the sanitizers.

    compute-sanitizer --tool memcheck --error-exitcode 86 python benchmarks/gpu/sanitize_case.py

Exit status: 0 when every case matched, 1 on a mismatch, 2 when CUDA or bigmodel's CUDA kernels
are missing.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

import bigmodel  # noqa: F401  (registers torch.ops.bigmodel.*)
from bigmodel.ops.lstm import lstm_layer
from bigmodel.reference import lstm_layer_reference


@dataclass(frozen=True)
class Case:
    name: str
    T: int
    B: int
    I: int  # noqa: E741
    H: int
    P: int  # 0: no projection
    lengths: tuple[int, ...] | None
    reverse: bool
    bias: bool
    dtype: torch.dtype
    backward: bool = True
    grad_c_n: bool = True  # False: c_n does not reach the loss (its gradient arrives as None)
    cuda_lstm: str = "auto"  # BIGMODEL_CUDA_LSTM: "stepwise" forces the per-step forward


CASES = [
    Case("plain", 5, 3, 4, 5, 0, None, False, True, torch.float32),
    Case("lengths-reverse", 5, 3, 4, 5, 0, (2, 5, 4), True, True, torch.float32, grad_c_n=False),
    Case("lengths-proj-nobias-H33", 6, 4, 3, 33, 7, (6, 1, 3, 6), False, False, torch.float32),
    Case("reverse-proj-B7", 4, 7, 6, 5, 3, None, True, True, torch.float32),
    Case("float64-lengths-reverse-proj", 4, 5, 3, 6, 2, (1, 4, 2, 4, 3), True, True, torch.float64),
    Case("bfloat16-lengths-reverse", 5, 3, 8, 8, 0, (5, 2, 4), True, True, torch.bfloat16, backward=False),
    # Persistent kernel with two units per block on up to 132 SMs, the last block's second unit past H
    # (H = 263), rows ending at different steps (and starting, in reverse), one row of length 1, and a
    # last step (first, in reverse) that no sequence reaches.
    Case("persistent-lengths-H263", 5, 7, 5, 263, 0, (4, 1, 3, 4, 2, 4, 3), False, True, torch.float32),
    Case(
        "persistent-lengths-reverse-H263", 5, 7, 5, 263, 0, (4, 1, 3, 4, 2, 4, 3), True, False, torch.float32
    ),
    Case("stepwise-plain", 5, 3, 4, 5, 0, None, False, True, torch.float32, cuda_lstm="stepwise"),
    Case(
        "stepwise-lengths-reverse", 5, 3, 4, 5, 0, (2, 5, 4), True, True, torch.float32, cuda_lstm="stepwise"
    ),
]

TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-7),
    torch.float32: dict(atol=2e-4, rtol=2e-4),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def make_inputs(c: Case, gen: torch.Generator) -> list[torch.Tensor | None]:
    """The op's tensor arguments, drawn in float64 and rounded to the case's dtype."""
    Pout = c.P or c.H
    k = c.H**-0.5

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return ((torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * scale).to(c.dtype)

    return [
        rand(c.T, c.B, c.I),
        rand(c.B, Pout),
        rand(c.B, c.H),
        rand(4 * c.H, c.I, scale=k),
        rand(4 * c.H, Pout, scale=k),
        rand(4 * c.H, scale=k) if c.bias else None,
        rand(4 * c.H, scale=k) if c.bias else None,
        rand(Pout, c.H, scale=k) if c.P else None,
    ]


def check(what: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, failures: list[str]) -> None:
    try:
        torch.testing.assert_close(got.detach().cpu().double(), want.detach().double(), **TOL[dtype])
    except AssertionError as e:
        failures.append(f"{what}: {str(e).splitlines()[0]} ...")


def run_case(c: Case, gen: torch.Generator) -> list[str]:
    failures: list[str] = []
    os.environ["BIGMODEL_CUDA_LSTM"] = c.cuda_lstm  # read by the op on every call
    cpu = make_inputs(c, gen)
    lengths_cpu = torch.tensor(c.lengths, dtype=torch.long) if c.lengths is not None else None
    lengths = lengths_cpu.cuda() if lengths_cpu is not None else None
    dev = [t.cuda().requires_grad_(c.backward) if t is not None else None for t in cpu]
    ref_in = [t.double().requires_grad_(c.backward) if t is not None else None for t in cpu]

    out = lstm_layer(*dev, lengths=lengths, reverse=c.reverse)
    ref = lstm_layer_reference(*ref_in, lengths=lengths_cpu, reverse=c.reverse)
    for name, o, r in zip(("output", "h_n", "c_n"), out, ref, strict=True):
        check(name, o, r, c.dtype, failures)

    # The inference path (no workspace kept for backward), straight through the op.
    with torch.no_grad():
        inf = torch.ops.bigmodel.lstm_layer(
            *[t.detach() if t is not None else None for t in dev], lengths, c.reverse, False
        )
    for name, o, r in zip(
        ("output (train=False)", "h_n (train=False)", "c_n (train=False)"), inf[:3], ref, strict=True
    ):
        check(name, o, r, c.dtype, failures)

    if c.backward:
        seeds = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in ref]
        used = [0, 1, 2] if c.grad_c_n else [0, 1]
        loss = sum((out[i] * seeds[i].to(out[i].dtype).cuda()).sum() for i in used)
        loss_ref = sum((ref[i] * seeds[i]).sum() for i in used)
        present = [t for t in dev if t is not None]
        present_ref = [t for t in ref_in if t is not None]
        grads = torch.autograd.grad(loss, present)
        grads_ref = torch.autograd.grad(loss_ref, present_ref)
        arg_names = ("input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")
        names = [n for n, t in zip(arg_names, dev, strict=True) if t is not None]
        for name, g, r in zip(names, grads, grads_ref, strict=True):
            check(f"grad_{name}", g, r, c.dtype, failures)

    torch.cuda.synchronize()  # any asynchronous CUDA error surfaces in this case, not the next one
    return failures


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_case: CUDA is not available", flush=True)
        return 2
    if not torch._C._dispatch_has_kernel_for_dispatch_key("bigmodel::lstm_layer", "CUDA"):
        print("sanitize_case: bigmodel was built without its CUDA kernels", flush=True)
        return 2
    gen = torch.Generator().manual_seed(0)
    bad = 0
    for c in CASES:
        print(
            f"sanitize_case: {c.name} ({c.dtype}, T={c.T} B={c.B} I={c.I} H={c.H} P={c.P}, "
            f"lengths={c.lengths}, reverse={c.reverse}, bias={c.bias}, backward={c.backward}, "
            f"BIGMODEL_CUDA_LSTM={c.cuda_lstm})",
            flush=True,
        )
        failures = run_case(c, gen)
        for f in failures:
            print(f"  MISMATCH {c.name}: {f}", flush=True)
        bad += bool(failures)
    if bad:
        print(f"sanitize_case: FAILED: {bad} of {len(CASES)} cases differ from the reference", flush=True)
        return 1
    print(f"sanitize_case: OK: {len(CASES)} cases match the reference", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
