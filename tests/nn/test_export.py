"""Deployment paths for models built from bigmodel's layers: torch.export with dynamic batch and
sequence sizes (saved and loaded again), an AOTInductor package, and torch.compile across batches
whose shapes change (as a length-bucketed loader feeds them)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bigmodel

TOL = {"atol": 1e-5, "rtol": 1e-4}


class Tagger(nn.Module):
    """Every layer bigmodel replaces: a 2-layer bidirectional LSTM with lengths, self-attention over
    its outputs with key padding, an LSTMCell step over the pooled state, a head."""

    def __init__(self):
        super().__init__()
        self.lstm = bigmodel.nn.LSTM(8, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.attn = bigmodel.nn.MultiheadAttention(12, 2, batch_first=True)
        self.cell = bigmodel.nn.LSTMCell(12, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x, lengths):
        out, _ = self.lstm(x, lengths=lengths)
        pad = torch.arange(x.shape[1], device=x.device)[None, :] >= lengths[:, None]
        ctx, _ = self.attn(out, out, out, key_padding_mask=pad, need_weights=False)
        h, _ = self.cell(ctx.mean(1))
        return self.head(h)


def _batch(B, T, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 8, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    return x.to(device), lengths.to(device)


def _model(device):
    torch.manual_seed(0)
    return Tagger().to(device).eval()


def test_export_with_dynamic_batch_and_length(device, tmp_path):
    """One exported program serves other batch sizes and lengths, before and after save / load, with
    eager's results; bigmodel's ops stay whole in the graph."""
    model = _model(device)
    B, T = torch.export.Dim("B", min=2, max=512), torch.export.Dim("T", min=2, max=4096)
    program = torch.export.export(model, _batch(4, 10, device, 1), dynamic_shapes=({0: B, 1: T}, {0: B}))
    ops = {str(n.target) for n in program.graph.nodes if str(n.target).startswith("bigmodel.")}
    assert ops == {"bigmodel.lstm_layer.default", "bigmodel.attention.default"}
    path = tmp_path / "tagger.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    with torch.no_grad():
        for shape in ((6, 13), (2, 3), (9, 40)):
            x, lengths = _batch(*shape, device, sum(shape))
            expected = model(x, lengths)
            torch.testing.assert_close(program.module()(x, lengths), expected, **TOL)
            torch.testing.assert_close(loaded.module()(x, lengths), expected, **TOL)


def test_aot_inductor_package(tmp_path):
    """An AOTInductor package (C++ compiled ahead of time, for serving without Python model code)
    calls bigmodel's CPU kernels: the process that loads it has imported bigmodel."""
    aoti_compile = getattr(torch._inductor, "aoti_compile_and_package", None)
    if aoti_compile is None:
        pytest.skip(f"torch {torch.__version__} has no torch._inductor.aoti_compile_and_package")
    model = _model("cpu")
    B, T = torch.export.Dim("B", min=2, max=512), torch.export.Dim("T", min=2, max=4096)
    program = torch.export.export(model, _batch(4, 10, "cpu", 1), dynamic_shapes=({0: B, 1: T}, {0: B}))
    package = aoti_compile(program, package_path=str(tmp_path / "tagger_aoti.pt2"))
    runner = torch._inductor.aoti_load_package(package)
    with torch.no_grad():
        for shape in ((6, 13), (3, 7)):
            x, lengths = _batch(*shape, "cpu", sum(shape))
            torch.testing.assert_close(runner(x, lengths), model(x, lengths), **TOL)


def test_compile_across_changing_batch_shapes(device):
    """Training batches of new sizes and lengths: torch.compile(fullgraph=True) recompiles once, for
    dynamic shapes, and every step's loss and gradients equal eager's."""
    torch._dynamo.reset()
    model = _model(device).train()
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    params = list(model.parameters())
    for step, shape in enumerate(((5, 9), (7, 13), (3, 21), (8, 4), (5, 9))):
        x, lengths = _batch(*shape, device, step)
        expected = model(x, lengths).square().sum()
        expected_grads = torch.autograd.grad(expected, params)
        loss = compiled(x, lengths).square().sum()
        grads = torch.autograd.grad(loss, params)
        torch.testing.assert_close(loss, expected, **TOL)
        for g, ge in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(g, ge, **TOL)
    assert len(compiles) == 2  # the first shapes, then one graph for every later shape
