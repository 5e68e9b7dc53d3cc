"""bigmodel: fused LSTM and attention kernels for PyTorch, as drop-in layers.

Importing the package loads the compiled extension (``bigmodel._C``), which registers the ops as
``torch.ops.bigmodel.*`` (and the LSTM's autograd formula); the Python side registers the fake
kernels and the attention's autograd formula.
"""

import torch  # noqa: F401  (the extension links against libtorch)

from . import (
    _C,  # noqa: F401  (registers torch.ops.bigmodel.*)
    nn,  # noqa: F401  (drop-in modules)
    ops,  # noqa: F401  (fake kernels and autograd)
)

__version__ = "0.1.0"
