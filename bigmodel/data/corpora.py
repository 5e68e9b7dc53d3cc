"""Corpus loaders: IMDB's aclImdb layout, CSV/TSV, polarity files, and the synthetic corpus.

Every loader returns a :class:`Corpus` of raw texts and integer labels (binary: 1 positive,
0 negative) split into train and test; a corpus without its own test split gets a seeded 90/10
split. Anything wrong with the data raises :class:`DataError`, whose one-line message names the file.

Encoding policy: aclImdb and CSV files must be UTF-8 (a byte-order mark is allowed); a file that is
not is an error naming the file and the byte offset. Polarity files are read line by line: a line
that is not valid UTF-8 is decoded as Latin-1 instead, because the original distribution of the MR
corpus (rt-polarity v1.0) is Latin-1 encoded; such lines are counted in :attr:`Corpus.notes`, so
the caller can say so, and nothing is dropped.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .synthetic import synthetic_reviews

__all__ = [
    "FORMATS",
    "LABELS",
    "Corpus",
    "DataError",
    "Split",
    "load_aclimdb",
    "load_corpus",
    "load_csv",
    "load_polarity",
    "load_synthetic",
    "split_train_test",
]

FORMATS = ("aclimdb", "csv", "polarity")
# Label spellings accepted in CSV files (after strip and lower-case).
LABELS = {"pos": 1, "positive": 1, "1": 1, "neg": 0, "negative": 0, "0": 0}
SYNTHETIC_TRAIN = 20_000
SYNTHETIC_TEST = 2000


class DataError(Exception):
    """The data cannot be used; the message is one line that says what and where."""


@dataclass
class Split:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class Corpus:
    """Train and test texts with labels in ``[0, num_classes)``; ``notes`` are things worth telling."""

    name: str
    train: Split
    test: Split
    num_classes: int = 2
    notes: list[str] = field(default_factory=list)


def split_train_test(
    texts: list[str], labels: list[int], seed: int, test_fraction: float = 0.1
) -> tuple[Split, Split]:
    """A seeded random split; the test part has ``round(test_fraction * n)`` examples, at least one."""
    n = len(texts)
    if n < 2:
        raise DataError(f"need at least 2 examples to split into train and test, got {n}")
    n_test = min(n - 1, max(1, round(test_fraction * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    test, train = perm[:n_test], perm[n_test:]
    return (
        Split([texts[i] for i in train], [labels[i] for i in train]),
        Split([texts[i] for i in test], [labels[i] for i in test]),
    )


def _read_utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not valid UTF-8 (byte {e.start}: {data[e.start : e.start + 1]!r})"
        ) from None


def load_aclimdb(root: str | Path) -> Corpus:
    """IMDB's ``aclImdb``: ``{train,test}/{pos,neg}/*.txt``, one review per file (``unsup`` is ignored)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory")
    splits = {}
    for split in ("train", "test"):
        texts, labels = [], []
        for name, label in (("pos", 1), ("neg", 0)):
            folder = root / split / name
            if not folder.is_dir():
                raise DataError(f"{root}: not an aclImdb directory: {folder} is missing")
            for path in sorted(folder.glob("*.txt")):
                texts.append(_read_utf8(path))
                labels.append(label)
        if not texts:
            raise DataError(f"{root / split}: empty corpus split, no *.txt files under pos/ or neg/")
        splits[split] = Split(texts, labels)
    return Corpus(f"aclImdb ({root})", splits["train"], splits["test"])


def load_csv(
    path: str | Path, text_column: str = "text", label_column: str = "label", seed: int = 0
) -> Corpus:
    """A CSV (``,``) or, for ``*.tsv``/``*.tab``, TSV file with a header row naming its columns.

    Labels may be spelled ``pos``/``neg``, ``positive``/``negative`` or ``1``/``0`` (any case).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    reader = csv.DictReader(io.StringIO(_read_utf8(path), newline=""), delimiter=delimiter)
    columns = reader.fieldnames or []
    for role, column in (("text", text_column), ("label", label_column)):
        if column not in columns:
            raise DataError(f"{path}: no {role} column {column!r} in the header (columns: {columns})")
    texts, labels = [], []
    try:
        for row in reader:
            raw = row[label_column]
            label = LABELS.get((raw or "").strip().lower())
            if label is None:
                raise DataError(
                    f"{path}, line {reader.line_num}: unknown label {raw!r} "
                    f"(expected one of {', '.join(sorted(LABELS))})"
                )
            texts.append(row[text_column] or "")
            labels.append(label)
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: malformed CSV: {e}") from None
    if not texts:
        raise DataError(f"{path}: empty corpus, no rows after the header")
    train, test = split_train_test(texts, labels, seed)
    return Corpus(f"CSV ({path})", train, test)


def load_polarity(root: str | Path, seed: int = 0) -> Corpus:
    """A directory of ``*.pos`` and ``*.neg`` files with one example per line (blank lines skipped),
    the layout of the MR corpus (``rt-polarity.pos``, ``rt-polarity.neg``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory")
    files = [(p, 1) for p in sorted(root.glob("*.pos"))] + [(p, 0) for p in sorted(root.glob("*.neg"))]
    if not files:
        raise DataError(f"{root}: not a polarity directory: no *.pos or *.neg files")
    texts, labels, notes = [], [], []
    for path, label in files:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e.strerror}") from None
        latin1 = 0
        for line in data.split(b"\n"):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                text = line.decode("latin-1")
                latin1 += 1
            text = text.strip()
            if text:
                texts.append(text)
                labels.append(label)
        if latin1:
            notes.append(f"{path}: {latin1} line(s) not valid UTF-8, read as Latin-1")
    if not texts:
        raise DataError(f"{root}: empty corpus, the *.pos and *.neg files hold no lines")
    train, test = split_train_test(texts, labels, seed)
    return Corpus(f"polarity ({root})", train, test, notes=notes)


def load_synthetic(
    seed: int = 0, train_size: int = SYNTHETIC_TRAIN, test_size: int = SYNTHETIC_TEST
) -> Corpus:
    """The synthetic corpus (:mod:`bigmodel.data.synthetic`); train and test come from one stream."""
    texts, labels = synthetic_reviews(train_size + test_size, seed)
    return Corpus(
        f"synthetic (seed {seed})",
        Split(texts[:train_size], labels[:train_size]),
        Split(texts[train_size:], labels[train_size:]),
    )


def detect_format(path: Path) -> str:
    if path.is_file():
        return "csv"
    if (path / "train").is_dir():
        return "aclimdb"
    if any(path.glob("*.pos")) or any(path.glob("*.neg")):
        return "polarity"
    raise DataError(f"{path}: cannot tell the format, pass --format ({'|'.join(FORMATS)})")


def load_corpus(
    path: str | Path | None,
    format: str | None = None,
    *,
    seed: int = 0,
    text_column: str = "text",
    label_column: str = "label",
) -> Corpus:
    """The corpus at ``path`` in ``format`` (detected from the layout when None); ``path=None`` gives
    the synthetic corpus. ``seed`` drives the 90/10 split of corpora without a test split."""
    if path is None:
        if format is not None:
            raise DataError(f"format {format!r} was given but no data path")
        return load_synthetic(seed)
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    format = format or detect_format(path)
    if format == "aclimdb":
        return load_aclimdb(path)
    if format == "csv":
        return load_csv(path, text_column, label_column, seed)
    if format == "polarity":
        return load_polarity(path, seed)
    raise DataError(f"unknown data format {format!r}, expected one of {', '.join(FORMATS)}")
