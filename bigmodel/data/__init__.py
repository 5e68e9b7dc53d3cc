"""Text data for the classifier: corpus loaders, tokenizer, vocabulary, length-bucketed batching."""

from .batching import BucketBatchSampler, TextDataset, pad_batch
from .corpora import (
    FORMATS,
    Corpus,
    DataError,
    Split,
    load_aclimdb,
    load_corpus,
    load_csv,
    load_polarity,
    load_synthetic,
    split_train_test,
)
from .synthetic import synthetic_reviews
from .tokenizer import tokenize
from .vocab import PAD, UNK, Vocab, encode_texts

__all__ = [
    "FORMATS",
    "PAD",
    "UNK",
    "BucketBatchSampler",
    "Corpus",
    "DataError",
    "Split",
    "TextDataset",
    "Vocab",
    "encode_texts",
    "load_aclimdb",
    "load_corpus",
    "load_csv",
    "load_polarity",
    "load_synthetic",
    "pad_batch",
    "split_train_test",
    "synthetic_reviews",
    "tokenize",
]
