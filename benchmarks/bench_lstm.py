"""nn.LSTM vs bigmodel.nn.LSTM, side by side in one parametrization (float32, all cores).

Run through `python -m bigmodel bench`, which runs this file twice (glibc's allocator as users
run it, and tuned to keep freed blocks) and prints the table. Directly:

    python -m pytest benchmarks/bench_lstm.py --benchmark-json=out.json [--device cuda]

On CUDA every timed call ends with a synchronize, so the time is kernel time, not launch time.
"""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import bigmodel.nn

# (name, T, B, IN, H, num_layers, bidirectional)
SHAPES = [
    ("seed", 256, 64, 100, 200, 1, False),
    ("long", 512, 32, 256, 256, 1, False),
    ("small", 128, 16, 128, 128, 1, False),
    # one sequence at a time, as a server answering single requests runs it
    ("serve", 256, 1, 100, 200, 1, False),
    ("2L-bidir", 256, 32, 256, 256, 2, True),
]
# train-features: training with an input that needs no gradient (raw features: audio frames, sensor
# series, a frozen embedding); seed shape only, not in --quick.
MODES = ["forward", "train", "varlen-train", "forward-bf16", "train-bf16", "train-features"]
IMPLS = ["native", "bigmodel"]


def _make(impl, shape, device):
    _, T, B, IN, H, L, bidir = shape
    torch.manual_seed(0)
    ref = nn.LSTM(IN, H, num_layers=L, bidirectional=bidir)
    if impl == "native":
        return ref.to(device)
    ours = bigmodel.nn.LSTM(IN, H, num_layers=L, bidirectional=bidir)
    ours.load_state_dict(ref.state_dict())
    return ours.to(device)


def _step(impl, mode, model, x, lengths):
    params = list(model.parameters())
    if mode in ("forward", "forward-bf16"):

        def fn():
            with torch.no_grad():
                return model(x)

        return fn

    if mode in ("train", "train-bf16", "train-features"):

        def fn():
            for p in params:
                p.grad = None
            x.grad = None
            out, _ = model(x)
            out.sum().backward()

        return fn

    def fn():  # varlen-train
        for p in params:
            p.grad = None
        x.grad = None
        if impl == "native":
            packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
            out, _ = model(packed)
            out.data.sum().backward()
        else:
            out, _ = model(x, lengths=lengths)
            out.sum().backward()

    return fn


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_lstm(time_round, quick, device, timed, shape, mode, impl, rnd):
    if quick and shape[0] != "seed":
        pytest.skip("--quick runs the seed shape only")
    if mode == "train-features" and (quick or shape[0] != "seed"):
        pytest.skip("train-features: seed shape only, not in --quick")
    _, T, B, IN, H, L, bidir = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, IN, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)  # on the CPU, as pack_padded_sequence wants

    def build():
        model = _make(impl, shape, device)
        # In training the input requires grad, as in the seed classifier where an Embedding feeds the
        # LSTM: both sides must compute the input gradient (but in train-features).
        needs_grad = not mode.startswith("forward") and mode != "train-features"
        xd = x.to(device)
        if mode.endswith("-bf16"):  # bf16 module and input on both sides
            model = model.bfloat16()
            xd = xd.bfloat16()
        return timed(_step(impl, mode, model, xd.requires_grad_(needs_grad), lengths))

    slow = not mode.startswith("forward")
    time_round(
        build,
        rounds=(3 if slow else 5) if quick else (7 if slow else 15),
        op="lstm",
        case=shape[0],
        shape=f"T={T} B={B} I={IN} H={H} L={L}" + (" bidir" if bidir else ""),
        mode=mode,
        impl=impl,
        device=device,
        tokens=int(lengths.sum()) if mode == "varlen-train" else T * B,
    )


# nn.LSTMCell driven one step at a time (step-by-step decoding, custom recurrences): every call is one
# step, so per-call costs that a whole-sequence call amortizes are paid T times.
# cell-decode: the same at batch 1, as a decoder serving one request runs (per-call costs dominate).
CELL_SHAPES = [("cell-steps", 20, 64, 100, 200), ("cell-decode", 20, 1, 100, 200)]
CELL_MODES = ["forward", "train"]


def _cell_step(mode, cell, x):
    T, B, _ = x.shape
    H = cell.hidden_size
    params = list(cell.parameters())

    def run():
        h = torch.zeros(B, H, device=x.device)
        c = torch.zeros(B, H, device=x.device)
        for t in range(T):
            h, c = cell(x[t], (h, c))
        return h

    if mode == "forward":

        def fn():
            with torch.no_grad():
                return run()

        return fn

    def fn():  # train: the loss on the last state, backward through all steps
        for p in params:
            p.grad = None
        x.grad = None
        run().sum().backward()

    return fn


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", CELL_MODES)
@pytest.mark.parametrize("shape", CELL_SHAPES, ids=[s[0] for s in CELL_SHAPES])
def test_lstm_cell_steps(time_round, quick, device, timed, shape, mode, impl, rnd):
    name, T, B, IN, H = shape

    def build():
        torch.manual_seed(0)
        cell = nn.LSTMCell(IN, H)
        if impl == "bigmodel":
            ours = bigmodel.nn.LSTMCell(IN, H)
            ours.load_state_dict(cell.state_dict())
            cell = ours
        cell = cell.to(device)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(T, B, IN, generator=g).to(device).requires_grad_(mode == "train")
        return timed(_cell_step(mode, cell, x))

    time_round(
        build,
        rounds=5 if quick else 15,
        warmup=2,
        op="lstm",
        case=name,
        shape=f"LSTMCell, {T} calls of B={B} I={IN} H={H}",
        mode=mode,
        impl=impl,
        device=device,
        tokens=T * B,
    )
