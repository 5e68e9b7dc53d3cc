"""bigmodel.nn.LSTM inside torch.compile(fullgraph=True): no graph break, eager results."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bigmodel

TOL = {"atol": 1e-5, "rtol": 1e-4}


class Classifier(nn.Module):
    """Embedding -> 2-layer bidirectional LSTM -> Linear, reading h_n and the per-step output."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.lstm = bigmodel.nn.LSTM(8, 6, num_layers=2, bidirectional=True, batch_first=True, proj_size=4)
        self.head = nn.Linear(8 + 4, 3)

    def forward(self, tokens, lengths=None):
        out, (h_n, _) = self.lstm(self.embed(tokens), lengths=lengths)
        pooled = out.sum(1) / out.shape[1]
        return self.head(torch.cat([pooled, h_n[-1]], dim=1))


def test_compiled_matches_eager(device):
    torch._dynamo.reset()
    model = Classifier().to(device)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    tokens = torch.randint(0, 50, (5, 9), device=device)
    lengths = torch.tensor([9, 1, 4, 9, 6], device=device)
    for kwargs in ({}, {"lengths": lengths}):
        expected = model(tokens, **kwargs)
        expected_grads = torch.autograd.grad(expected.square().sum(), list(model.parameters()))
        out = compiled(tokens, **kwargs)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
        torch.testing.assert_close(out, expected, **TOL)
        for g, ge in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(g, ge, **TOL)


def test_compiled_training_on_raw_features(device):
    """Features that need no gradient (the first layer's backward then forms no dx): a compiled
    training step's gradients equal eager's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    lstm = bigmodel.nn.LSTM(70, 37, num_layers=2, batch_first=True).to(device)
    x = torch.randn(6, 11, 70, device=device)  # no requires_grad

    def loss(x):
        return lstm(x)[0].square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="inductor")
    expected = torch.autograd.grad(loss(x), list(lstm.parameters()))
    got = torch.autograd.grad(compiled(x), list(lstm.parameters()))
    for g, ge in zip(got, expected, strict=True):
        torch.testing.assert_close(g, ge, **TOL)


@pytest.mark.parametrize("cls", ["LSTM", "LSTMCell", "LSTMCell-hx"])
def test_no_graph_break(device, cls):
    """LSTMCell-hx: the cell's lean path (a (h, c) pair given), whose argument checks run only when
    the op rejects the call."""
    torch._dynamo.reset()
    args = ()
    if cls == "LSTM":
        module, x = bigmodel.nn.LSTM(4, 5, bidirectional=True).to(device), torch.randn(3, 2, 4, device=device)
    else:
        module, x = bigmodel.nn.LSTMCell(4, 5).to(device), torch.randn(2, 4, device=device)
        if cls == "LSTMCell-hx":
            args = ((torch.randn(2, 5, device=device), torch.randn(2, 5, device=device)),)
    explanation = torch._dynamo.explain(module)(x, *args)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
