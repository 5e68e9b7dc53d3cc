"""Options shared by the benchmark files.

``--quick``: fewer rounds and only the seed shape, for a smoke run (the `bigmodel bench --quick`).
"""

import pytest


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False, help="fewer rounds, seed shape only")


@pytest.fixture
def quick(request):
    return request.config.getoption("--quick")
