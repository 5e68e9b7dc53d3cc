"""A small attention workload on CUDA for compute-sanitizer (memcheck, racecheck); run by run.sh.

Forward and backward of ``torch.ops.bigmodel.attention`` on both CUDA paths - tensor cores
(bfloat16/float16, d in {32, 64, 128}) and the generic kernel (float32, an attn_mask, odd head dims) -
with partial blocks, GQA, key lengths, causal and dropout, compared with ``bigmodel.reference`` in
float64 on the CPU, so a kernel that writes out of bounds or races and still "runs" also fails here.

    compute-sanitizer --tool memcheck --error-exitcode 86 python benchmarks/gpu/sanitize_attention.py

Exit status: 0 when every case matched, 1 on a mismatch, 2 when CUDA or the CUDA kernel is missing.
"""

from __future__ import annotations

import sys

import torch

import bigmodel  # noqa: F401  (registers torch.ops.bigmodel.*)
from bigmodel.ops.attention import attention
from bigmodel.reference import attention_reference

# (name, dtype, B, Hq, Hkv, Lq, Lk, d, dv, causal, lengths, mask, dropout_p, tolerance)
CASES = [
    ("tc-bf16-d32", torch.bfloat16, 2, 2, 1, 70, 90, 32, 32, True, (90, 17), False, 0.0, 5e-2),
    ("tc-fp16-d64", torch.float16, 1, 2, 2, 65, 130, 64, 64, False, (100,), False, 0.0, 1e-2),
    ("tc-bf16-d128-dropout", torch.bfloat16, 1, 2, 1, 33, 70, 128, 128, True, None, False, 0.2, 5e-2),
    ("generic-fp32-mask", torch.float32, 2, 2, 1, 19, 23, 40, 24, False, (23, 5), True, 0.0, 1e-4),
    ("generic-fp32-dropout", torch.float32, 1, 2, 2, 9, 40, 16, 8, True, None, False, 0.3, 1e-4),
]


def run(case) -> bool:
    name, dtype, B, Hq, Hkv, Lq, Lk, d, dv, causal, lengths, use_mask, p, tol = case
    g = torch.Generator().manual_seed(len(name))
    q = torch.randn(B, Hq, Lq, d, generator=g)
    k = torch.randn(B, Hkv, Lk, d, generator=g)
    v = torch.randn(B, Hkv, Lk, dv, generator=g)
    grad = torch.randn(B, Hq, Lq, dv, generator=g)
    mask = torch.rand(B, 1, Lq, Lk, generator=g) > 0.2 if use_mask else None
    kl = torch.tensor(lengths) if lengths is not None else None
    kw = dict(is_causal=causal, dropout_p=p, seed=7)

    def grads(dev, dt):
        ts = [t.to(dev, dt).requires_grad_() for t in (q, k, v)]
        m = mask.to(dev) if mask is not None else None
        lens = kl.to(dev) if kl is not None else None
        fn = attention if dev == "cuda" else attention_reference
        out = fn(*ts, attn_mask=m, key_lengths=lens, **kw)[0]
        return (out, *torch.autograd.grad(out, ts, grad.to(dev, dt)))

    got = [t.double().cpu() for t in grads("cuda", dtype)]
    torch.cuda.synchronize()
    want = grads("cpu", torch.float64)
    errs = [(a - b).abs().max().item() for a, b in zip(got, want, strict=False)]
    ok = all(e <= tol * max(1.0, b.abs().max().item()) for e, b in zip(errs, want, strict=False))
    print(
        f"sanitize_attention: {name}: max errors out/dq/dk/dv {', '.join(f'{e:.2e}' for e in errs)} "
        f"{'ok' if ok else 'MISMATCH'}",
        flush=True,
    )
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_attention: CUDA is not available", flush=True)
        return 2
    if not torch._C._dispatch_has_kernel_for_dispatch_key("bigmodel::attention", "CUDA"):
        print("sanitize_attention: bigmodel was built without its CUDA attention kernel", flush=True)
        return 2
    bad = sum(not run(c) for c in CASES)
    if bad:
        print(
            f"sanitize_attention: FAILED: {bad} of {len(CASES)} cases differ from the reference", flush=True
        )
        return 1
    print(f"sanitize_attention: OK: {len(CASES)} cases match the reference", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
