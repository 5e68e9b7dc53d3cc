"""Options shared by the benchmark files.

``--quick``: fewer rounds and only the seed shape, for a smoke run (the `bigmodel bench --quick`).
``--device cpu|cuda``: where the benchmarks that take the ``device`` fixture run (default cpu).
"""

import pytest


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False, help="fewer rounds, seed shape only")
    parser.addoption("--device", choices=["cpu", "cuda"], default="cpu", help="device to benchmark on")


@pytest.fixture
def quick(request):
    return request.config.getoption("--quick")


@pytest.fixture
def device(request):
    import torch

    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda: CUDA is not available")
    return name


@pytest.fixture
def timed(device):
    """Wraps a benchmark step so that on CUDA it ends with a synchronize: kernel time, not launch time."""
    if device != "cuda":
        return lambda fn: fn

    import torch

    def wrap(fn):
        def step():
            fn()
            torch.cuda.synchronize()

        return step

    return wrap
