"""A portable build (-march=x86-64-v2: SSE4.2, the AVX2 and AVX-512 kernels reached only through their
target attributes) on a CPU without AVX-512: .ci/run runs this under
`qemu-x86_64 -cpu Haswell` against the CMake build's ops library. It checks that the library loads
and reports AVX2 only, and that the LSTM (AVX2 tiles, forward and backward through its C++
autograd; a single step on the step kernels) and the attention op (portable path) give PyTorch's
results on small shapes. Any AVX-512 or AMX instruction reached on this path is a SIGILL here."""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F


def check(name: str, got: torch.Tensor, want: torch.Tensor, **tol: float) -> None:
    torch.testing.assert_close(got, want, msg=lambda m: f"{name}: {m}", **tol)
    print(f"ok  {name}")


def lstm_matches_native(kernel: str) -> None:
    os.environ["BIGMODEL_CPU_KERNEL"] = kernel
    torch.manual_seed(0)
    T, B, I, H = 7, 9, 10, 24
    ref = torch.nn.LSTM(I, H)
    x = torch.randn(T, B, I, requires_grad=True)
    lengths = torch.tensor([7, 7, 6, 5, 5, 4, 3, 2, 1])
    h0 = torch.zeros(B, H)
    params = [ref.weight_ih_l0, ref.weight_hh_l0, ref.bias_ih_l0, ref.bias_hh_l0]
    out, h_n, _, _, _ = torch.ops.bigmodel.lstm_layer(x, h0, h0, *params, None, lengths, False, True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths)
    ref_packed, (ref_h, _) = ref(packed)
    ref_out, _ = torch.nn.utils.rnn.pad_packed_sequence(ref_packed, total_length=T)
    check(f"lstm[{kernel}] output", out, ref_out, atol=1e-5, rtol=1e-4)
    check(f"lstm[{kernel}] h_n", h_n, ref_h[0], atol=1e-5, rtol=1e-4)
    seed = torch.randn_like(out)
    got = torch.autograd.grad((out * seed).sum() + h_n.sum(), [x, *params])
    want = torch.autograd.grad((ref_out * seed).sum() + ref_h.sum(), [x, *params])
    for name, g, w in zip(["x", "w_ih", "w_hh", "b_ih", "b_hh"], got, want, strict=True):
        check(f"lstm[{kernel}] grad {name}", g, w, atol=1e-5, rtol=1e-4)


def step_matches_native() -> None:
    """One step of three rows: the single-step kernels (at::vec at the build's AVX2 width)."""
    os.environ["BIGMODEL_CPU_KERNEL"] = "auto"
    torch.manual_seed(0)
    B, I, H = 3, 10, 70
    ref = torch.nn.LSTMCell(I, H)
    x, h0, c0 = torch.randn(B, I, requires_grad=True), torch.randn(B, H), torch.randn(B, H)
    params = [ref.weight_ih, ref.weight_hh, ref.bias_ih, ref.bias_hh]
    _, h, c, _, _ = torch.ops.bigmodel.lstm_layer(x.unsqueeze(0), h0, c0, *params, None, None, False, True)
    ref_h, ref_c = ref(x, (h0, c0))
    check("lstm step h", h, ref_h, atol=1e-5, rtol=1e-4)
    check("lstm step c", c, ref_c, atol=1e-5, rtol=1e-4)
    got = torch.autograd.grad(h.sum() + 2 * c.sum(), [x, *params])
    want = torch.autograd.grad(ref_h.sum() + 2 * ref_c.sum(), [x, *params])
    for name, g, w in zip(["x", "w_ih", "w_hh", "b_ih", "b_hh"], got, want, strict=True):
        check(f"lstm step grad {name}", g, w, atol=1e-5, rtol=1e-4)


def attention_matches_native() -> None:
    os.environ["BIGMODEL_CPU_KERNEL"] = "auto"
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 33, 16) for _ in range(3))
    out, _ = torch.ops.bigmodel.attention(q, k, v, None, None, True, None, 0.0, 0)
    check("attention causal", out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-4)


def main() -> None:
    torch.ops.load_library(sys.argv[1])
    info = dict(line.split("=", 1) for line in torch.ops.bigmodel.build_info().splitlines() if "=" in line)
    print(info)
    expected = {"cpu_avx512": "0", "cpu_amx_bf16": "0", "cpu_avx2": "1"}
    wrong = {k: info.get(k) for k, v in expected.items() if info.get(k) != v}
    assert not wrong, f"this check needs a CPU with AVX2 and without AVX-512; the library reports {wrong}"
    assert info["cpu_arch"] != "native", "this check needs a portable build (BIGMODEL_CPU_ARCH), not -march=native"
    for kernel in ("auto", "generic"):
        lstm_matches_native(kernel)
    step_matches_native()
    attention_matches_native()
    print("portable build: all checks passed")


if __name__ == "__main__":
    main()
