"""Shared fixtures: the devices every op and module test runs on."""

from __future__ import annotations

import pytest
import torch

import bigmodel  # noqa: F401  (registers torch.ops.bigmodel.*)


def _cuda_skip_reason(op: str) -> str | None:
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("bigmodel::lstm_layer", "CUDA"):
        return "bigmodel was built without its CUDA kernels"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"):
        return f"{op} has no CUDA kernel yet"
    return None


_LSTM_CUDA_SKIP = _cuda_skip_reason("bigmodel::lstm_layer")


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(_LSTM_CUDA_SKIP is not None, reason=_LSTM_CUDA_SKIP or "")
        ),
    ]
)
def device(request) -> str:
    """Each device bigmodel's kernels were built for; CUDA skips with the reason when absent.

    A module testing another op says so with ``pytestmark = pytest.mark.op("bigmodel::<name>")``;
    its CUDA cases then skip while that op has no CUDA kernel."""
    return request.param


def _runs_bf16(item) -> bool:
    """The test runs a bf16 case: its name or its parameters say so."""
    return "bfloat16" in item.name or "bf16" in item.name


def pytest_collection_modifyitems(config, items) -> None:
    """CUDA cases skip with the reason when CUDA or the op's CUDA kernel is missing: the `cuda`
    parameter of the `device` fixture for modules marked `op(...)`, and every test marked `cuda`
    (CUDA-only tests; their op is the module's `op` marker, else the LSTM).

    The `avx512-fp32` kernel set differs from `avx512` only for bf16 LSTM layers, so its other
    cases are deselected rather than run twice."""
    same = [
        item
        for item in items
        if getattr(item, "callspec", None) is not None
        and item.callspec.params.get("cpu_kernel") == "avx512-fp32"
        and not _runs_bf16(item)
    ]
    if same:
        config.hook.pytest_deselected(items=same)
        drop = set(map(id, same))
        items[:] = [item for item in items if id(item) not in drop]
    for item in items:
        callspec = getattr(item, "callspec", None)
        marker = item.get_closest_marker("op")
        cuda_only = item.get_closest_marker("cuda") is not None
        device = callspec.params.get("device") if callspec is not None else None
        on_cuda_param = marker is not None and device == "cuda"
        if not (cuda_only or on_cuda_param):
            continue
        reason = _cuda_skip_reason(marker.args[0] if marker is not None else "bigmodel::lstm_layer")
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


_BUILD_INFO = dict(line.split("=", 1) for line in torch.ops.bigmodel.build_info().splitlines() if "=" in line)
_NO_AVX2 = _BUILD_INFO.get("cpu_avx2") != "1"
_NO_AVX512 = _BUILD_INFO.get("cpu_avx512") != "1"


@pytest.fixture(
    params=[
        "auto",
        pytest.param(
            "avx512",
            marks=pytest.mark.skipif(_NO_AVX512, reason="this CPU (or build) has no AVX-512 kernels"),
        ),
        pytest.param(
            "avx512-fp32",
            marks=pytest.mark.skipif(_NO_AVX512, reason="this CPU (or build) has no AVX-512 kernels"),
        ),
        pytest.param(
            "avx2", marks=pytest.mark.skipif(_NO_AVX2, reason="this CPU (or build) has no AVX2 + FMA kernels")
        ),
        "generic",
    ]
)
def cpu_kernel(request, monkeypatch) -> str:
    """Runs a CPU test on each CPU kernel set through BIGMODEL_CPU_KERNEL: the best micro-kernels
    the CPU has ("auto": AMX for bf16 and AVX-512, else AVX2), the AVX-512 ones without AMX
    ("avx512": the bf16 paths a CPU with AVX512-BF16 and no AMX runs; "avx512-fp32": its bf16 LSTM
    on float32 FMA tiles, as where vdpbf16ps does not pay), the AVX2 micro-kernels even on an
    AVX-512 CPU ("avx2"), and the ATen-BLAS path ("generic")."""
    monkeypatch.setenv("BIGMODEL_CPU_KERNEL", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _keep_threads():
    """Tests set torch's process-wide thread count (and `bigmodel train --threads` does); each gets the
    count it started with back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "op(name): the bigmodel op a test module exercises (for CUDA skips)")
    config.addinivalue_line(
        "markers", "cuda: a CUDA-only test (skips, with the reason, without CUDA or the kernel)"
    )
    # nn.LSTM (the oracle) says so on every projected CPU call; it is about PyTorch, not bigmodel.
    config.addinivalue_line(
        "filterwarnings", "ignore:LSTM with projections is not supported with oneDNN:UserWarning"
    )
