"""Options and the round-by-round pairing shared by the benchmark files.

``--quick``: fewer rounds and only the seed shape, for a smoke run (the `bigmodel bench --quick`).
``--device cpu|cuda``: where the benchmarks that take the ``device`` fixture run (default cpu).

Every case is timed in rounds that alternate between the two sides: native's round 0, bigmodel's
round 0, native's round 1, and so on. A test that takes the ``rnd`` argument is one round of one side
(pytest-benchmark records one timing per test); ``bigmodel bench`` takes the median over a side's
rounds. On a shared machine a slow stretch of the host then falls on both sides' rounds, where one
side's rounds timed back to back, then the other's, let it fall on one side only and move the ratio
by a third. The layer, its inputs and its first (untimed) call are made once per side and case and
reused by the later rounds, so a round costs one call.
"""

import pytest

IMPL_ORDER = {"native": 0, "bigmodel": 1}
MAX_ROUNDS = {True: 5, False: 15}  # --quick, full suite: the most rounds any case times


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False, help="fewer rounds, seed shape only")
    parser.addoption("--device", choices=["cpu", "cuda"], default="cpu", help="device to benchmark on")


def pytest_generate_tests(metafunc):
    if "rnd" in metafunc.fixturenames:
        n = MAX_ROUNDS[metafunc.config.getoption("--quick")]
        metafunc.parametrize("rnd", range(n), ids=[f"r{i}" for i in range(n)])


def _params(item) -> dict:
    """A collected test's parameters ({} for a test without any)."""
    callspec = getattr(item, "callspec", None)
    return callspec.params if callspec is not None else {}


def _case_of(item) -> tuple:
    """The case a round belongs to: the test and its parameters but the round and the side."""
    rest = tuple((k, repr(v)) for k, v in _params(item).items() if k not in ("rnd", "impl"))
    return (item.path, item.originalname, rest)


def pytest_collection_modifyitems(items):
    """Each case's rounds in a row, alternating sides: r0 native, r0 bigmodel, r1 native, ..."""
    first_seen: dict[tuple, int] = {}
    keys = {}
    for item in items:
        case = _case_of(item)
        first_seen.setdefault(case, len(first_seen))
        params = _params(item)
        keys[item.nodeid] = (first_seen[case], params.get("rnd", 0), IMPL_ORDER.get(params.get("impl"), 0))
    items.sort(key=lambda item: keys[item.nodeid])


class _Prepared:
    """The current case's timed callables, one per side, kept from round to round."""

    def __init__(self):
        self.case = None
        self.fns = {}


@pytest.fixture(scope="session")
def _prepared():
    return _Prepared()


@pytest.fixture
def time_round(request, benchmark, _prepared):
    """``time_round(build, rounds=N, warmup=W, **info)``: times one call of ``build()``'s callable as
    round ``rnd`` of this side of the case (skipping rounds past N), recording ``info`` for the table.
    ``build`` runs, followed by W untimed calls, only where this side of the case has no callable yet."""
    case = _case_of(request.node)
    params = _params(request.node)
    impl, rnd = params["impl"], params["rnd"]

    def run(build, *, rounds: int, warmup: int = 1, **info):
        if rnd >= rounds:
            pytest.skip(f"this case times {rounds} rounds")
        if _prepared.case != case:
            _prepared.case, _prepared.fns = case, {}
        fresh = impl not in _prepared.fns
        if fresh:
            _prepared.fns[impl] = build()
        benchmark.extra_info.update(info, round=rnd)
        benchmark.pedantic(_prepared.fns[impl], rounds=1, warmup_rounds=warmup if fresh else 0, iterations=1)

    return run


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
