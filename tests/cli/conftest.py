"""Helpers for the command tests: a small corpus on disk and in-process `bigmodel` runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigmodel.cli.main import main
from bigmodel.data import synthetic_reviews

# A model small enough that an epoch over the small corpus takes well under a second.
TINY = ["--embed-dim", "8", "--hidden-dim", "8", "--batch-size", "16", "--lr", "0.01", "--threads", "1"]


@pytest.fixture
def small_corpus(tmp_path) -> Path:
    """400 synthetic reviews as a polarity directory (360 train / 40 test)."""
    texts, labels = synthetic_reviews(400, seed=7)
    root = tmp_path / "corpus"
    root.mkdir()
    for suffix, label in (("pos", 1), ("neg", 0)):
        lines = [t for t, y in zip(texts, labels, strict=True) if y == label]
        (root / f"reviews.{suffix}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


@pytest.fixture
def train():
    """Runs `bigmodel train ARGS...` in this process; returns the exit code."""

    def run(*args: str | Path) -> int:
        return main(["train", *map(str, args)])

    return run


@pytest.fixture
def read_json():
    return lambda path: json.loads(Path(path).read_text())
