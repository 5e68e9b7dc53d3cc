"""bigmodel.nn.swap: native LSTMs replaced in place, same Parameter objects, same results."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bigmodel

TOL = {"atol": 1e-5, "rtol": 1e-4}


class Tagger(nn.Module):
    """A model with LSTMs at several depths and inside containers, one of them shared."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.encoder = nn.Sequential(nn.Identity(), nn.LSTM(6, 5, num_layers=2, bidirectional=True))
        self.shared = nn.LSTM(10, 4, proj_size=3, batch_first=False)
        self.heads = nn.ModuleDict({"a": self.shared, "cell": nn.LSTMCell(3, 7)})
        self.out = nn.Linear(7, 2)

    def forward(self, tokens):
        x = self.embed(tokens)
        x, _ = self.encoder[1](self.encoder[0](x))
        x, _ = self.heads["a"](x)
        h, _ = self.heads["cell"](x[-1])
        return self.out(h)


def test_swap_keeps_parameters_and_results(device):
    model = Tagger().to(device)
    model.heads["cell"].eval()
    tokens = torch.randint(0, 11, (9, 3), device=device)
    expected = model(tokens)
    expected_grads = torch.autograd.grad(expected.sum(), list(model.parameters()))
    params = dict(model.named_parameters())
    modes = {name: m.training for name, m in model.named_modules()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    assert bigmodel.nn.swap(model) is model

    assert type(model.encoder[1]) is bigmodel.nn.LSTM
    assert type(model.shared) is bigmodel.nn.LSTM
    assert model.heads["a"] is model.shared  # one shared replacement
    assert type(model.heads["cell"]) is bigmodel.nn.LSTMCell
    assert not any(isinstance(m, (nn.LSTM, nn.LSTMCell)) for m in model.modules())
    new_params = dict(model.named_parameters())
    assert list(new_params) == list(params)
    assert all(new_params[n] is p for n, p in params.items())
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(p.device.type == torch.device(device).type for p in model.parameters())

    out = model(tokens)
    torch.testing.assert_close(out, expected, **TOL)
    for g, ge in zip(torch.autograd.grad(out.sum(), list(model.parameters())), expected_grads, strict=True):
        torch.testing.assert_close(g, ge, **TOL)

    # The optimizer built before the swap still updates the live parameters.
    before = model.shared.weight_hr_l0.detach().clone()
    optimizer.zero_grad()
    model(tokens).sum().backward()
    optimizer.step()
    assert not torch.equal(model.shared.weight_hr_l0, before)


@pytest.mark.parametrize(
    "make",
    [
        lambda d: nn.LSTM(4, 5, num_layers=2, bidirectional=True, proj_size=3, batch_first=True, device=d),
        lambda d: nn.LSTM(4, 5, bias=False, device=d),
        lambda d: nn.LSTMCell(4, 5, device=d),
    ],
    ids=["lstm", "lstm-nobias", "cell"],
)
def test_swap_top_level_module(device, make):
    native = make(device)
    native.eval()
    x = (
        torch.randn(3, 6, 4, device=device)
        if isinstance(native, nn.LSTM)
        else torch.randn(3, 4, device=device)
    )
    expected = native(x)
    params = list(native.parameters())
    fused = bigmodel.nn.swap(native)
    assert type(fused) in (bigmodel.nn.LSTM, bigmodel.nn.LSTMCell)
    assert not fused.training
    assert all(a is b for a, b in zip(fused.parameters(), params, strict=True))
    assert repr(fused) == repr(native)
    torch.testing.assert_close(fused(x), expected, **TOL)


def test_swap_leaves_subclasses_and_other_modules_alone():
    class MyLSTM(nn.LSTM):
        pass

    model = nn.Sequential(MyLSTM(4, 5), nn.GRU(4, 5), nn.Linear(4, 5))
    before = list(model)
    bigmodel.nn.swap(model)
    assert all(a is b for a, b in zip(model, before, strict=True))


def test_swap_does_not_allocate_or_initialise(device, monkeypatch):
    model = nn.Sequential(nn.LSTM(4, 5, num_layers=2), nn.LSTMCell(5, 5)).to(device)
    snapshot = [p.detach().clone() for p in model.parameters()]
    calls = []
    monkeypatch.setattr(torch.nn.init, "uniform_", lambda t, *a, **k: calls.append(t.device.type) or t)
    bigmodel.nn.swap(model)
    assert set(calls) <= {"meta"}  # anything the constructor initialised lived on meta
    for p, s in zip(model.parameters(), snapshot, strict=True):
        torch.testing.assert_close(p, s, rtol=0, atol=0)


def test_swap_replaces_multihead_attention_with_the_same_parameters():
    import bigmodel.nn

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.MultiheadAttention(16, 4, batch_first=True))
    before = dict(model.named_parameters())
    x = torch.randn(3, 7, 16)
    ref, _ = model[0](x, x, x, need_weights=False)
    bigmodel.nn.swap(model)
    assert type(model[0]) is bigmodel.nn.MultiheadAttention
    after = dict(model.named_parameters())
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    out, _ = model[0](x, x, x, need_weights=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
