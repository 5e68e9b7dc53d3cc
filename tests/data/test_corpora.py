import pytest

from bigmodel.data import (
    DataError,
    load_aclimdb,
    load_corpus,
    load_csv,
    load_polarity,
    load_synthetic,
    split_train_test,
    synthetic_reviews,
    tokenize,
)
from bigmodel.data.synthetic import NEGATIVE, POSITIVE


def _pairs(corpus):
    """text -> label over both splits."""
    split = (corpus.train, corpus.test)
    return {t: y for s in split for t, y in zip(s.texts, s.labels, strict=True)}


# ---- aclImdb ----


def _write_aclimdb(root, per_class=2):
    for split in ("train", "test"):
        for name in ("pos", "neg"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"{i}_7.txt").write_text(
                    f"{split} {name} review {i}<br />the end", encoding="utf-8"
                )
    return root


def test_aclimdb(tmp_path):
    corpus = load_aclimdb(_write_aclimdb(tmp_path / "aclImdb"))
    assert len(corpus.train) == len(corpus.test) == 4
    for split, name in ((corpus.train, "train"), (corpus.test, "test")):
        for text, label in zip(split.texts, split.labels, strict=True):
            assert text.startswith(f"{name} {'pos' if label else 'neg'}")
    assert sorted(corpus.train.labels) == [0, 0, 1, 1]
    assert load_corpus(tmp_path / "aclImdb").train.texts == corpus.train.texts  # format detected


def test_aclimdb_missing_folder(tmp_path):
    root = _write_aclimdb(tmp_path / "aclImdb")
    for f in (root / "test" / "neg").iterdir():
        f.unlink()
    (root / "test" / "neg").rmdir()
    with pytest.raises(DataError, match="test/neg is missing"):
        load_aclimdb(root)


def test_aclimdb_empty_split(tmp_path):
    root = tmp_path / "aclImdb"
    for split in ("train", "test"):
        for name in ("pos", "neg"):
            (root / split / name).mkdir(parents=True)
    with pytest.raises(DataError, match="empty corpus"):
        load_aclimdb(root)


def test_aclimdb_not_utf8_names_the_file(tmp_path):
    root = _write_aclimdb(tmp_path / "aclImdb")
    bad = root / "train" / "neg" / "1_7.txt"
    bad.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(DataError, match=r"1_7\.txt: not valid UTF-8 \(byte 3"):
        load_aclimdb(root)


# ---- CSV / TSV ----


def test_csv_label_spellings_and_split(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = [
        "text,label",
        '"great, really",pos',
        "awful,NEG",
        "fine,1",
        "meh,0",
        "loved it,Positive",
        "no,negative",
    ]
    rows += [f"filler {i},{'pos' if i % 2 else 'neg'}" for i in range(14)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    corpus = load_csv(path, seed=0)
    assert (len(corpus.train), len(corpus.test)) == (18, 2)
    pairs = _pairs(corpus)
    assert pairs["great, really"] == 1 and pairs["awful"] == 0 and pairs["fine"] == 1 and pairs["meh"] == 0
    assert pairs["loved it"] == 1 and pairs["no"] == 0
    again = load_csv(path, seed=0)
    assert again.test.texts == corpus.test.texts
    assert load_csv(path, seed=1).test.texts != corpus.test.texts


def test_tsv_with_named_columns_and_bom(tmp_path):
    path = tmp_path / "reviews.tsv"
    path.write_text("\ufeffid\tsentiment\treview\n1\tpos\tgood, good\n2\tneg\tbad\n", encoding="utf-8")
    corpus = load_csv(path, text_column="review", label_column="sentiment")
    texts = sorted(corpus.train.texts + corpus.test.texts)
    assert texts == ["bad", "good, good"]


def test_csv_unknown_label_names_file_and_line(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("text,label\ngood,pos\nhmm,neutral\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"r\.csv, line 3: unknown label 'neutral'"):
        load_csv(path)


def test_csv_missing_column(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("review,label\ngood,pos\n", encoding="utf-8")
    with pytest.raises(DataError, match="no text column 'text'"):
        load_csv(path)


def test_csv_empty_and_not_utf8(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty corpus"):
        load_csv(path)
    path.write_bytes(b"text,label\nna\xefve,pos\nok,neg\n")
    with pytest.raises(DataError, match="not valid UTF-8"):
        load_csv(path)


# ---- polarity ----


def test_polarity(tmp_path):
    (tmp_path / "rt.pos").write_text("good one\n\nfine film\n", encoding="utf-8")
    (tmp_path / "rt.neg").write_text("bad one\r\ndull\r\nawful\r\n", encoding="utf-8")
    corpus = load_polarity(tmp_path)
    pairs = _pairs(corpus)
    assert pairs == {"good one": 1, "fine film": 1, "bad one": 0, "dull": 0, "awful": 0}
    assert len(corpus.test) == 1 and corpus.notes == []
    assert load_corpus(tmp_path).train.texts == corpus.train.texts  # format detected


def test_polarity_reads_latin1_lines_and_says_so(tmp_path):
    (tmp_path / "rt.pos").write_bytes("caf\u00e9 society\n".encode() + b"a caf\xe9 film\n")
    (tmp_path / "rt.neg").write_bytes(b"bad\n")
    corpus = load_polarity(tmp_path)
    texts = corpus.train.texts + corpus.test.texts
    assert texts.count("a caf\u00e9 film") == 1 and texts.count("caf\u00e9 society") == 1
    assert len(corpus.notes) == 1 and "rt.pos: 1 line(s) not valid UTF-8, read as Latin-1" in corpus.notes[0]


def test_polarity_empty_or_missing(tmp_path):
    with pytest.raises(DataError, match=r"no \*\.pos or \*\.neg files"):
        load_polarity(tmp_path)
    (tmp_path / "a.pos").write_text("\n\n")
    (tmp_path / "a.neg").write_text("")
    with pytest.raises(DataError, match="empty corpus"):
        load_polarity(tmp_path)


# ---- dispatch, split, synthetic ----


def test_load_corpus_missing_path_and_unknown_layout(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_corpus(tmp_path / "nope")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_corpus(tmp_path)
    with pytest.raises(DataError, match="unknown data format"):
        load_corpus(tmp_path, "parquet")
    with pytest.raises(DataError, match="no data path"):
        load_corpus(None, "csv")


def test_split_train_test():
    texts, labels = [str(i) for i in range(100)], [i % 2 for i in range(100)]
    train, test = split_train_test(texts, labels, seed=5)
    assert (len(train), len(test)) == (90, 10)
    assert sorted(train.texts + test.texts, key=int) == texts
    assert all(int(t) % 2 == y for t, y in zip(test.texts, test.labels, strict=True))
    assert split_train_test(texts, labels, seed=5)[1].texts == test.texts
    assert split_train_test(texts, labels, seed=6)[1].texts != test.texts
    with pytest.raises(DataError):
        split_train_test(["x"], [1], seed=0)


def test_synthetic_is_seeded_and_balanced():
    assert synthetic_reviews(50, 1) == synthetic_reviews(50, 1)
    assert synthetic_reviews(50, 1) != synthetic_reviews(50, 2)
    corpus = load_synthetic(0, 600, 100)
    assert (len(corpus.train), len(corpus.test)) == (600, 100)
    assert 0.4 < sum(corpus.train.labels) / 600 < 0.6
    assert load_corpus(None).name.startswith("synthetic")


def test_synthetic_label_is_polarity_flipped_by_negation():
    texts, labels = synthetic_reviews(400, 0)
    negators = {"not", "n't", "never"}
    flips = 0
    for text, label in zip(texts, labels, strict=True):
        tokens = tokenize(text)
        (word,) = [t for t in tokens if t in POSITIVE or t in NEGATIVE]
        negated = bool(negators & set(tokens))
        flips += negated
        assert label == int((word in POSITIVE) != negated)
    assert 100 < flips < 300
