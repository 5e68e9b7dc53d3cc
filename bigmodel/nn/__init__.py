"""Drop-in modules on bigmodel's fused ops, and ``swap`` to put them into an existing model."""

from . import functional
from .attention import MultiheadAttention
from .lstm import LSTM, LSTMCell, swap

__all__ = ["LSTM", "LSTMCell", "MultiheadAttention", "functional", "swap"]
