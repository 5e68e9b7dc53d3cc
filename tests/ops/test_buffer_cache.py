"""bigmodel's CPU buffer cache (csrc/common/pool.h): freed kernel buffers are kept for the next call
and `bigmodel.empty_cache()` hands them back."""

import os
import subprocess
import sys

import torch

import bigmodel
from bigmodel.nn import LSTM


def _train_step(model, x):
    out, _ = model(x)
    out.sum().backward()
    return out


def test_empty_cache_releases_freed_blocks_and_keeps_live_ones():
    torch.manual_seed(0)
    model = LSTM(64, 128)
    x = torch.randn(64, 32, 64, requires_grad=True)  # gates: 64 x 32 x 512 floats = 4 MiB
    _train_step(model, x)  # its buffers are freed into the cache
    assert bigmodel.empty_cache() > 0
    assert bigmodel.empty_cache() == 0
    kept = _train_step(model, x).detach()
    expected = kept.clone()
    bigmodel.empty_cache()  # the output's block is live: it stays, and so do its values
    assert torch.equal(kept, expected)
    again = _train_step(model, x).detach()  # fresh blocks after the cache was emptied
    assert torch.equal(again, expected)


SCRIPT = """
import torch, bigmodel
from bigmodel.nn import LSTM
m = LSTM(64, 128)
out, _ = m(torch.randn(64, 32, 64, requires_grad=True))
out.sum().backward()
del out
print(bigmodel.empty_cache())
"""


def test_cache_limit_zero_keeps_nothing():
    env = {**os.environ, "BIGMODEL_CACHE_MB": "0"}
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.strip().splitlines()[-1]) == 0
