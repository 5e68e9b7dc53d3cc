"""Models built on bigmodel's layers."""

from .classifier import BACKENDS, POOLINGS, TextClassifier, self_attention

__all__ = ["BACKENDS", "POOLINGS", "TextClassifier", "self_attention"]
