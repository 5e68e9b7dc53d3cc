"""Shared fixtures: the devices every op and module test runs on."""

from __future__ import annotations

import pytest
import torch

import bigmodel  # noqa: F401  (registers torch.ops.bigmodel.*)


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("bigmodel::lstm_layer", "CUDA"):
        return "bigmodel was built without its CUDA kernels"
    return None


_CUDA_SKIP = _cuda_skip_reason()

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(_CUDA_SKIP is not None, reason=_CUDA_SKIP or "")),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Each device bigmodel's kernels were built for; CUDA skips with the reason when absent."""
    return request.param


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_configure(config) -> None:
    # nn.LSTM (the oracle) says so on every projected CPU call; it is about PyTorch, not bigmodel.
    config.addinivalue_line(
        "filterwarnings", "ignore:LSTM with projections is not supported with oneDNN:UserWarning"
    )
