"""bigmodel.nn.LSTM against torch.nn.LSTM: outputs, states and every gradient, after copying weights."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pack_sequence, pad_packed_sequence

import bigmodel

TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-4}, torch.float64: {"atol": 1e-12, "rtol": 1e-10}}


def make_pair(input_size, hidden_size, device, dtype=torch.float32, **kwargs):
    """An nn.LSTM and a bigmodel LSTM holding the same weights (copied through the state dict)."""
    ref = nn.LSTM(input_size, hidden_size, device=device, dtype=dtype, **kwargs)
    ours = bigmodel.nn.LSTM(input_size, hidden_size, device=device, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def run(module, input, hx=None, **kwargs):
    """Forward, then the gradients of a random projection of all outputs w.r.t. input, hx and params.

    The projection is drawn from a fixed seed, so two modules with equal outputs get equal upstream
    gradients.
    """
    out, (h_n, c_n) = module(input, hx, **kwargs)
    data = out.data if isinstance(out, PackedSequence) else out
    gen = torch.Generator().manual_seed(1)
    loss = sum(
        (t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t)).sum() for t in (data, h_n, c_n)
    )
    x = input.data if isinstance(input, PackedSequence) else input
    leaves = [t for t in (x, *(hx or ())) if t.requires_grad] + list(module.parameters())
    return out, h_n, c_n, torch.autograd.grad(loss, leaves)


def assert_same_run(a, b, tol):
    out_a, h_a, c_a, g_a = a
    out_b, h_b, c_b, g_b = b
    if isinstance(out_a, PackedSequence):
        assert isinstance(out_b, PackedSequence)
        torch.testing.assert_close(out_b.batch_sizes, out_a.batch_sizes, rtol=0, atol=0)
        for name in ("sorted_indices", "unsorted_indices"):
            ia, ib = getattr(out_a, name), getattr(out_b, name)
            assert (ia is None) == (ib is None), name
            if ia is not None:
                torch.testing.assert_close(ib, ia, rtol=0, atol=0)
        out_a, out_b = out_a.data, out_b.data
    torch.testing.assert_close(out_b, out_a, **tol)
    torch.testing.assert_close(h_b, h_a, **tol)
    torch.testing.assert_close(c_b, c_a, **tol)
    assert len(g_a) == len(g_b)
    for ga, gb in zip(g_a, g_b, strict=True):
        torch.testing.assert_close(gb, ga, **tol)


def make_input(T, B, IN, batch_first, device, dtype=torch.float32):
    shape = (B, T, IN) if batch_first else (T, B, IN)
    return torch.randn(shape, device=device, dtype=dtype, requires_grad=True)


def make_hx(num_layers, bidirectional, B, H, P, device, dtype=torch.float32):
    LD = num_layers * (2 if bidirectional else 1)
    return (
        torch.randn(LD, B, P or H, device=device, dtype=dtype, requires_grad=True),
        torch.randn(LD, B, H, device=device, dtype=dtype, requires_grad=True),
    )


# ---- parity over every flag combination, and over odd sizes ----

FLAG_NAMES = "num_layers,bidirectional,batch_first,bias,proj_size,with_hx"
ALL_FLAGS = list(
    itertools.product([1, 2], [False, True], [False, True], [False, True], [0, 3], [False, True])
)


@pytest.mark.parametrize(FLAG_NAMES, ALL_FLAGS)
def test_matches_nn_lstm_all_flags(device, num_layers, bidirectional, batch_first, bias, proj_size, with_hx):
    T, B, IN, H = 13, 3, 4, 5
    kwargs = dict(
        num_layers=num_layers,
        bidirectional=bidirectional,
        batch_first=batch_first,
        bias=bias,
        proj_size=proj_size,
    )
    ref, ours = make_pair(IN, H, device, **kwargs)
    x = make_input(T, B, IN, batch_first, device)
    hx = make_hx(num_layers, bidirectional, B, H, proj_size, device) if with_hx else None
    assert_same_run(run(ref, x, hx), run(ours, x, hx), TOL[torch.float32])


@pytest.mark.parametrize("B,H,T", list(itertools.product([1, 3, 7], [1, 5, 33], [1, 13])))
@pytest.mark.parametrize("full", [False, True], ids=["plain", "2layer-bidir-proj-hx"])
def test_matches_nn_lstm_sizes(device, cpu_kernel, B, H, T, full):
    IN = 6
    proj_size = H // 2 if full else 0  # 0 for H = 1, where no projection is possible
    kwargs = dict(num_layers=2, bidirectional=True, proj_size=proj_size) if full else {}
    ref, ours = make_pair(IN, H, device, **kwargs)
    x = make_input(T, B, IN, False, device)
    hx = make_hx(2, True, B, H, proj_size, device) if full else None
    assert_same_run(run(ref, x, hx), run(ours, x, hx), TOL[torch.float32])


def test_matches_nn_lstm_float64(device):
    ref, ours = make_pair(4, 5, device, torch.float64, num_layers=2, bidirectional=True, proj_size=2)
    x = make_input(13, 3, 4, False, device, torch.float64)
    hx = make_hx(2, True, 3, 5, 2, device, torch.float64)
    assert_same_run(run(ref, x, hx), run(ours, x, hx), TOL[torch.float64])


# ---- input forms ----


@pytest.mark.parametrize("with_hx", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input(device, with_hx, batch_first):
    ref, ours = make_pair(
        4, 5, device, num_layers=2, bidirectional=True, proj_size=3, batch_first=batch_first
    )
    x = torch.randn(7, 4, device=device, requires_grad=True)
    hx = None
    if with_hx:
        hx = tuple(t[:, 0].detach().requires_grad_() for t in make_hx(2, True, 1, 5, 3, device))
    a, b = run(ref, x, hx), run(ours, x, hx)
    assert b[0].shape == (7, 6) and b[1].shape == (4, 3) and b[2].shape == (4, 5)
    assert_same_run(a, b, TOL[torch.float32])


@pytest.mark.parametrize("with_hx", [False, True])
@pytest.mark.parametrize("enforce_sorted", [False, True])
@pytest.mark.parametrize("bidirectional,proj_size", [(False, 0), (True, 0), (True, 3)])
def test_packed_sequence(device, with_hx, enforce_sorted, bidirectional, proj_size):
    lengths = [13, 13, 9, 4, 1] if enforce_sorted else [4, 13, 1, 9, 4, 13]
    B, IN, H = len(lengths), 4, 5
    ref, ours = make_pair(IN, H, device, num_layers=2, bidirectional=bidirectional, proj_size=proj_size)
    x = make_input(max(lengths), B, IN, False, device)
    packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=enforce_sorted)
    hx = make_hx(2, bidirectional, B, H, proj_size, device) if with_hx else None
    a, b = run(ref, packed, hx), run(ours, packed, hx)
    assert_same_run(a, b, TOL[torch.float32])


def test_packed_sequence_keeps_its_own_permutation(device):
    """Ties in length: the output keeps the input's sorted_indices, whatever a fresh sort would give."""
    ref, ours = make_pair(3, 5, device, bidirectional=True)
    seqs = [torch.randn(n, 3, device=device) for n in (3, 5, 3, 5, 1, 3)]
    batch_sizes = pack_sequence(seqs, enforce_sorted=False).batch_sizes
    for permuted in ([3, 1, 2, 0, 5, 4], [1, 3, 5, 0, 2, 4]):  # two valid orders for these lengths
        permuted = torch.tensor(permuted, device=device)
        padded = nn.utils.rnn.pad_sequence(seqs)
        data = torch.cat([padded[t, permuted[: int(bs)]] for t, bs in enumerate(batch_sizes)])
        packed = PackedSequence(data.requires_grad_(), batch_sizes, permuted, torch.argsort(permuted))
        assert_same_run(run(ref, packed), run(ours, packed), TOL[torch.float32])


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional,proj_size", [(False, 0), (True, 0), (True, 3)])
@pytest.mark.parametrize("lengths_dtype,lengths_on_device", [(torch.int64, False), (torch.int32, True)])
def test_lengths_matches_packed(
    device, batch_first, bidirectional, proj_size, lengths_dtype, lengths_on_device
):
    lengths = [4, 13, 1, 9, 13]
    T, B, IN, H = 13, len(lengths), 4, 5
    ref, ours = make_pair(
        IN, H, device, num_layers=2, bidirectional=bidirectional, proj_size=proj_size, batch_first=batch_first
    )
    x = make_input(T, B, IN, batch_first, device)
    hx = make_hx(2, bidirectional, B, H, proj_size, device)
    lengths_t = torch.tensor(lengths, dtype=lengths_dtype, device=device if lengths_on_device else "cpu")

    class Packed(nn.Module):
        """nn.LSTM on the packed equivalent, padded back: what users write without bigmodel."""

        def __init__(self, lstm):
            super().__init__()
            self.lstm = lstm

        def forward(self, x, hx):
            packed = pack_padded_sequence(
                x, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False
            )
            out, state = self.lstm(packed, hx)
            return pad_packed_sequence(out, batch_first=batch_first, total_length=T)[0], state

    a = run(Packed(ref), x, hx)
    b = run(ours, x, hx, lengths=lengths_t)
    assert_same_run(a, b, TOL[torch.float32])
    out = b[0] if not batch_first else b[0].transpose(0, 1)
    for i, n in enumerate(lengths):
        assert (out[n:, i] == 0).all()


def test_lengths_unbatched(device):
    """A length-k run of an unbatched sequence is the run of its first k steps, then zeros."""
    ours = bigmodel.nn.LSTM(4, 5, num_layers=2, bidirectional=True, device=device)
    x = torch.randn(9, 4, device=device)
    out, (h_n, c_n) = ours(x, lengths=torch.tensor([6]))
    out_k, (h_k, c_k) = ours(x[:6])
    torch.testing.assert_close(out[:6], out_k, **TOL[torch.float32])
    assert (out[6:] == 0).all()
    torch.testing.assert_close(h_n, h_k, **TOL[torch.float32])
    torch.testing.assert_close(c_n, c_k, **TOL[torch.float32])


def test_lengths_all_full_equals_no_lengths(device):
    ref, ours = make_pair(4, 5, device, num_layers=2, bidirectional=True)
    x = make_input(6, 3, 4, False, device)
    assert_same_run(run(ours, x), run(ours, x, lengths=torch.full((3,), 6)), TOL[torch.float32])


@pytest.mark.parametrize("kind", ["strided-time", "permuted", "expanded-batch"])
def test_non_contiguous_input_and_hx(device, kind):
    ref, ours = make_pair(4, 5, device, num_layers=2, bidirectional=True, proj_size=3)
    if kind == "strided-time":
        x = torch.randn(26, 3, 8, device=device)[::2, :, ::2]
    elif kind == "permuted":
        x = torch.randn(3, 4, 13, device=device).permute(2, 0, 1)
    else:
        x = torch.randn(13, 1, 4, device=device).expand(13, 3, 4)
    assert not x.is_contiguous()
    h0 = torch.randn(3, 4, 3, device=device).transpose(0, 1)
    c0 = torch.randn(5, 4, 3, device=device).permute(1, 2, 0)
    assert not h0.is_contiguous() and not c0.is_contiguous()
    x.requires_grad_()
    a = run(ref, x, (h0, c0))
    b = run(ours, x, (h0, c0))
    assert_same_run(a, b, TOL[torch.float32])
    c = run(ours, x.detach().contiguous().requires_grad_(), (h0.contiguous(), c0.contiguous()))
    assert_same_run(c, b, {"atol": 1e-6, "rtol": 1e-6})


# ---- dropout ----


def test_dropout_eval_is_exact(device):
    ref, ours = make_pair(4, 5, device, num_layers=3, bidirectional=True, dropout=0.5)
    ref.eval()
    ours.eval()
    x = make_input(13, 3, 4, False, device)
    assert_same_run(run(ref, x), run(ours, x), TOL[torch.float32])


def test_dropout_train_matches_nn_lstm_in_distribution(device):
    """One sequence repeated over a large batch: each copy draws its own masks, so the batch mean and
    standard deviation of every output element estimate its distribution under dropout."""
    B, p = 4000, 0.5
    ref, ours = make_pair(4, 8, device, num_layers=2, bidirectional=True, dropout=p)
    x = torch.randn(5, 1, 4, device=device).expand(5, B, 4)
    with torch.no_grad():
        out_ref, out = ref(x)[0], ours(x)[0]
        eval_out = ours.eval()(x)[0]
    assert not torch.allclose(out, eval_out), "dropout was not applied in training"
    mean_ref, mean = out_ref.mean(1), out.mean(1)
    std_ref, std = out_ref.std(1), out.std(1)
    # Five standard errors of the difference of two means; the seed makes this deterministic.
    bound = 5 * torch.sqrt((std_ref**2 + std**2) / B) + 1e-6
    assert ((mean - mean_ref).abs() <= bound).all()
    torch.testing.assert_close(std, std_ref, atol=0.02, rtol=0.1)
    assert (std > 1e-3).all(), "outputs of the second layer must vary with the first layer's masks"


def test_dropout_only_between_layers(device):
    """With one layer there is nothing to drop (nn.LSTM warns); the last layer's output is never dropped."""
    with pytest.warns(UserWarning, match="dropout"):
        ours = bigmodel.nn.LSTM(4, 5, num_layers=1, dropout=0.5, device=device)
    x = torch.randn(6, 3, 4, device=device)
    with torch.no_grad():
        train_out = ours.train()(x)[0]
        eval_out = ours.eval()(x)[0]
    torch.testing.assert_close(train_out, eval_out, rtol=0, atol=0)


def test_dropout_train_is_reproducible_with_seed(device):
    ours = bigmodel.nn.LSTM(4, 5, num_layers=3, dropout=0.3, device=device)
    x = torch.randn(6, 3, 4, device=device)
    torch.manual_seed(123)
    a = ours(x)[0]
    torch.manual_seed(123)
    b = ours(x)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- low precision ----


@pytest.mark.parametrize("proj_size", [0, 7])
def test_bfloat16_error_within_twice_pytorch(device, cpu_kernel, proj_size):
    """bf16 module and input: the error against a float64 run of the same (bf16-representable)
    weights and input is at most twice nn.LSTM's own bf16 error, for outputs and gradients.
    Without projection the CPU runs the bf16 micro-kernels (h rounded to bf16 every step)."""
    kwargs = dict(num_layers=2, bidirectional=True, proj_size=proj_size)
    ref16, ours16 = make_pair(8, 33, device, torch.bfloat16, **kwargs)
    ref64 = nn.LSTM(8, 33, device=device, dtype=torch.float64, **kwargs)
    ref64.load_state_dict(ref16.state_dict())
    x16 = make_input(13, 7, 8, False, device, torch.bfloat16)
    x64 = x16.detach().double().requires_grad_()
    gold = run(ref64, x64)
    r, o = run(ref16, x16), run(ours16, x16)
    for k in range(3):
        err_ref = (r[k].double() - gold[k]).abs().max().item()
        err_ours = (o[k].double() - gold[k]).abs().max().item()
        assert o[k].dtype == torch.bfloat16
        assert err_ours <= 2 * err_ref + 1e-3, (k, err_ours, err_ref)
    for g_ref, g_ours, g_gold in zip(r[3], o[3], gold[3], strict=True):
        assert g_ours.dtype == torch.bfloat16
        err_ref = (g_ref.double() - g_gold).abs().max().item()
        err_ours = (g_ours.double() - g_gold).abs().max().item()
        assert err_ours <= 2 * err_ref + 1e-3, (err_ours, err_ref)


# ---- parameters, state dict, repr ----

CONFIGS = [
    dict(),
    dict(num_layers=3, bidirectional=True),
    dict(num_layers=2, bias=False, proj_size=2),
    dict(num_layers=2, bidirectional=True, proj_size=3, batch_first=True, dropout=0.25),
]


@pytest.mark.parametrize(
    "kwargs", CONFIGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default"
)
def test_parameters_like_nn_lstm(device, kwargs):
    ref, ours = make_pair(4, 5, device, **kwargs)
    names = [(n, p.shape) for n, p in ref.named_parameters()]
    assert [(n, p.shape) for n, p in ours.named_parameters()] == names
    assert ours._flat_weights_names == ref._flat_weights_names
    assert [[w.shape for w in ws] for ws in ours.all_weights] == [
        [w.shape for w in ws] for ws in ref.all_weights
    ]
    assert all(
        w is getattr(ours, n)
        for ws, ns in zip(ours.all_weights, ours._all_weights, strict=True)
        for w, n in zip(ws, ns, strict=True)
    )
    assert repr(ours) == repr(ref)
    for attr in (
        "input_size",
        "hidden_size",
        "num_layers",
        "bias",
        "batch_first",
        "dropout",
        "bidirectional",
        "proj_size",
        "mode",
    ):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    ours.flatten_parameters()


@pytest.mark.parametrize(
    "kwargs", CONFIGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default"
)
def test_state_dict_both_ways(device, kwargs):
    ref = nn.LSTM(4, 5, device=device, **kwargs)
    ours = bigmodel.nn.LSTM(4, 5, device=device, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    for (n, a), (m, b) in zip(ref.state_dict().items(), ours.state_dict().items(), strict=True):
        assert n == m
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    fresh = bigmodel.nn.LSTM(4, 5, device=device, **kwargs)
    ref.load_state_dict(fresh.state_dict(), strict=True)
    for a, b in zip(ref.parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_init_like_nn_lstm():
    H = 33
    ours = bigmodel.nn.LSTM(16, H, num_layers=2, bidirectional=True, proj_size=5)
    bound = 1 / math.sqrt(H)
    for name, p in ours.named_parameters():
        assert p.abs().max() <= bound, name
        assert p.std() > bound / 3, name  # U(-b, b) has std b / sqrt(3) ~ 0.58 b
    torch.manual_seed(7)
    ref = nn.LSTM(16, H, num_layers=2, bidirectional=True, proj_size=5)
    torch.manual_seed(7)
    ours = bigmodel.nn.LSTM(16, H, num_layers=2, bidirectional=True, proj_size=5)
    for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)  # same draws in the same order


def test_to_dtype_and_double(device):
    ref, ours = make_pair(4, 5, device, num_layers=2)
    ref.double()
    ours.double()
    x = make_input(6, 3, 4, False, device, torch.float64)
    assert_same_run(run(ref, x), run(ours, x), TOL[torch.float64])


def test_constructor_validation_like_nn_lstm():
    cases = [
        dict(dropout=1.5),
        dict(dropout=True),
        dict(bias=1),
        dict(batch_first="yes"),
        dict(num_layers=0),
        dict(proj_size=-1),
        dict(proj_size=5),
    ]
    for kwargs in cases:
        with pytest.raises((ValueError, TypeError)) as want:
            nn.LSTM(4, 5, **kwargs)
        with pytest.raises(want.type, match=re.escape(want.value.args[0])):
            bigmodel.nn.LSTM(4, 5, **kwargs)
    for args in [(0, 5), (4, 0), (4.0, 5), (4, "5")]:
        with pytest.raises((ValueError, TypeError)) as want:
            nn.LSTM(*args)
        with pytest.raises(want.type, match=re.escape(want.value.args[0])):
            bigmodel.nn.LSTM(*args)


def test_calls_from_several_python_threads():
    """A threaded server calls one model from several Python threads at once: each thread's output
    and gradients equal the same call made alone (the packed-weight cache, the buffer pool and the
    time loop's per-step barrier shared by concurrent calls, each with its own OpenMP team, more
    threads than cores)."""
    import threading

    torch.manual_seed(0)
    lstm = bigmodel.nn.LSTM(40, 64, num_layers=2, bidirectional=True)
    params = list(lstm.parameters())
    inputs = [torch.randn(30, 2 + 5 * i, 40, requires_grad=True) for i in range(4)]
    lengths = [torch.randint(1, 31, (x.shape[1],)) for x in inputs]

    def call(i):
        out, (h_n, _) = lstm(inputs[i], lengths=lengths[i])
        loss = out.square().sum() + h_n.sum()
        return [out.detach(), *torch.autograd.grad(loss, [inputs[i], *params])]

    expected = [call(i) for i in range(len(inputs))]
    got, errors = {}, []

    def worker(i):
        try:
            for _ in range(3):
                got[i] = call(i)
        except Exception as e:  # reported below, with the thread that raised it
            errors.append((i, e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "concurrent calls did not finish"
    assert not errors, errors
    for i, want in enumerate(expected):
        for g, e in zip(got[i], want, strict=True):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
