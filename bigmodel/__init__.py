"""bigmodel: fused LSTM and attention kernels for PyTorch, as drop-in layers.

Importing the package loads the compiled extension (``bigmodel._C``), which registers the ops as
``torch.ops.bigmodel.*`` (and the LSTM's autograd formula); the Python side registers the fake
kernels and the attention's autograd formula.
"""

import torch

from . import (
    _C,  # noqa: F401  (registers torch.ops.bigmodel.*)
    nn,  # noqa: F401  (drop-in modules)
    ops,  # noqa: F401  (fake kernels and autograd)
)

__version__ = "0.1.0"


def empty_cache() -> int:
    """Returns bigmodel's free CPU buffer blocks to the system; returns the bytes released.

    The CPU kernels take their large buffers (gates, outputs, gradients from 1 MiB up) from a cache
    of their own blocks and keep freed ones for the next call (at most ``BIGMODEL_CACHE_MB``, default
    2048 MiB). Blocks still held by live tensors stay; they return to the cache when freed."""
    return int(torch.ops.bigmodel.empty_cache())
