import pytest
import torch

from bigmodel.data import PAD, UNK, Vocab, encode_texts


def test_specials_come_first():
    vocab = Vocab.build([["b", "a"]])
    assert vocab.tokens[:2] == [PAD, UNK]
    assert (vocab.pad_id, vocab.unk_id) == (0, 1)


def test_order_is_frequency_then_alphabetical():
    vocab = Vocab.build([["c", "b", "a", "b"], ["c", "d"]])
    assert vocab.tokens == [PAD, UNK, "b", "c", "a", "d"]


def test_min_freq_and_max_size():
    texts = [["a", "a", "a", "b", "b", "c"]]
    assert Vocab.build(texts, min_freq=2).tokens == [PAD, UNK, "a", "b"]
    assert Vocab.build(texts, max_size=3).tokens == [PAD, UNK, "a"]


def test_encode_maps_unknown_to_unk():
    vocab = Vocab.build([["good", "film"]])
    assert vocab.encode(["good", "awful", "film"]) == [
        vocab.tokens.index("good"),
        1,
        vocab.tokens.index("film"),
    ]
    assert vocab.decode(vocab.encode(["film"])) == ["film"]


def test_specials_in_text_are_not_counted_twice():
    vocab = Vocab.build([[PAD, UNK, "x"]])
    assert vocab.tokens == [PAD, UNK, "x"]


def test_round_trips_through_its_token_list():
    vocab = Vocab.build([["x", "y", "y"]])
    assert Vocab(vocab.tokens).encode(["y", "x", "z"]) == vocab.encode(["y", "x", "z"])


@pytest.mark.parametrize("tokens", [["a", "b"], [PAD, UNK, "a", "a"]])
def test_rejects_bad_token_lists(tokens):
    with pytest.raises(ValueError):
        Vocab(tokens)


def test_build_rejects_bad_bounds():
    with pytest.raises(ValueError):
        Vocab.build([], min_freq=0)
    with pytest.raises(ValueError):
        Vocab.build([], max_size=1)


def test_encode_texts_truncates_and_never_returns_empty():
    vocab = Vocab.build([["a", "b", "c"]])
    ids = encode_texts([["a", "b", "c"], [], ["zzz"]], vocab, max_len=2)
    assert [t.tolist() for t in ids] == [vocab.encode(["a", "b"]), [vocab.unk_id], [vocab.unk_id]]
    assert all(t.dtype == torch.int64 for t in ids)
    with pytest.raises(ValueError):
        encode_texts([["a"]], vocab, max_len=0)
