import pytest
import torch
from torch import nn

import bigmodel.nn
from bigmodel.models import TextClassifier

V, E, H = 40, 8, 6


def _batch(B=5, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 1, 4, 7, 2, 9, 3][:B])
    ids = torch.randint(1, V, (B, T), generator=g)
    ids[torch.arange(T).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    return ids, lengths


def _pair(**kw):
    torch.manual_seed(0)
    fused = TextClassifier(V, E, H, backend="fused", **kw)
    torch.manual_seed(0)
    native = TextClassifier(V, E, H, backend="native", **kw)
    return fused, native


def test_backends_pick_their_lstm_with_the_same_parameters():
    fused, native = _pair(num_layers=2, bidirectional=True, attention=True, num_heads=3, pooling="attention")
    assert type(fused.lstm) is bigmodel.nn.LSTM and type(native.lstm) is nn.LSTM
    a, b = fused.state_dict(), native.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same initialisation


def test_checkpoint_of_one_backend_loads_into_the_other():
    torch.manual_seed(1)
    fused = TextClassifier(V, E, H, bidirectional=True, backend="fused")
    torch.manual_seed(2)
    native = TextClassifier(V, E, H, bidirectional=True, backend="native")
    native.load_state_dict(fused.state_dict())
    fused.load_state_dict(native.state_dict())
    ids, lengths = _batch()
    torch.testing.assert_close(fused(ids, lengths), native(ids, lengths))


@pytest.mark.parametrize("pooling", ["last", "mean", "attention"])
@pytest.mark.parametrize("attention", [False, True], ids=["lstm", "attn"])
@pytest.mark.parametrize(
    "layers,bidirectional", [(1, False), (1, True), (2, True)], ids=["1L", "bidir", "2L-bidir"]
)
def test_fused_and_native_agree_forward_and_backward(pooling, attention, layers, bidirectional):
    fused, native = _pair(
        num_layers=layers, bidirectional=bidirectional, attention=attention, num_heads=2, pooling=pooling
    )
    ids, lengths = _batch()
    labels = torch.tensor([1, 0, 1, 1, 0])
    out_f, out_n = fused(ids, lengths), native(ids, lengths)
    torch.testing.assert_close(out_f, out_n, atol=1e-6, rtol=1e-5)
    fused.loss(out_f, labels).backward()
    native.loss(out_n, labels).backward()
    for (name, p), q in zip(fused.named_parameters(), native.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["fused", "native"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_last_pooling_is_h_n(backend, bidirectional):
    torch.manual_seed(0)
    model = TextClassifier(V, E, H, num_layers=2, bidirectional=bidirectional, backend=backend)
    ids, lengths = _batch()
    pooled = model.pool(model.encode(ids, lengths), lengths)
    reference = nn.LSTM(E, H, num_layers=2, bidirectional=bidirectional, batch_first=True)
    reference.load_state_dict(model.lstm.state_dict())
    packed = nn.utils.rnn.pack_padded_sequence(
        model.embedding(ids), lengths, batch_first=True, enforce_sorted=False
    )
    _, (h_n, _) = reference(packed)
    expected = torch.cat([h_n[-2], h_n[-1]], dim=1) if bidirectional else h_n[-1]
    torch.testing.assert_close(pooled, expected)


@pytest.mark.parametrize("backend", ["fused", "native"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_last_pooling_forward_takes_h_n_with_the_same_gradients(backend, bidirectional):
    """forward pools "last" from h_n; the result and every gradient equal gathering the last valid
    step from the sequence (`pool(encode(...))`)."""
    torch.manual_seed(0)
    model = TextClassifier(V, E, H, num_layers=2, bidirectional=bidirectional, backend=backend).eval()
    ids, lengths = _batch()
    labels = torch.tensor([1, 0, 1, 1, 0])
    via_h_n = model(ids, lengths)
    grads = torch.autograd.grad(model.loss(via_h_n, labels), list(model.parameters()))
    via_seq = model.classifier(model.pool(model.encode(ids, lengths), lengths)).squeeze(-1)
    expected = torch.autograd.grad(model.loss(via_seq, labels), list(model.parameters()))
    torch.testing.assert_close(via_h_n, via_seq)
    for (name, _), g, e in zip(model.named_parameters(), grads, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["fused", "native"])
@pytest.mark.parametrize("pooling", ["last", "mean", "attention"])
@pytest.mark.parametrize("attention", [False, True], ids=["lstm", "attn"])
def test_padding_does_not_change_the_result(backend, pooling, attention):
    torch.manual_seed(0)
    model = TextClassifier(
        V, E, H, bidirectional=True, attention=attention, num_heads=2, pooling=pooling, backend=backend
    ).eval()
    ids, lengths = _batch()
    batched = model(ids, lengths)
    for b in range(len(lengths)):
        alone = model(ids[b : b + 1, : lengths[b]], lengths[b : b + 1])
        torch.testing.assert_close(batched[b : b + 1], alone, atol=1e-6, rtol=1e-5)
    longer = torch.cat([ids, torch.zeros(len(lengths), 4, dtype=ids.dtype)], dim=1)
    torch.testing.assert_close(model(longer, lengths), batched, atol=1e-6, rtol=1e-5)


def test_mean_pooling_is_the_mean_over_valid_steps():
    torch.manual_seed(0)
    model = TextClassifier(V, E, H, pooling="mean")
    ids, lengths = _batch()
    seq = model.encode(ids, lengths)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(model.pool(seq, lengths)[b], seq[b, :n].mean(0))


def test_binary_has_one_logit_and_bce():
    model = TextClassifier(V, E, H)
    ids, lengths = _batch()
    logits = model(ids, lengths)
    assert logits.shape == (5,)
    labels = torch.tensor([1, 0, 1, 0, 0])
    torch.testing.assert_close(
        model.loss(logits, labels), nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
    )
    assert model.predict(logits).tolist() == (logits > 0).long().tolist()


@pytest.mark.parametrize("backend", ["fused", "native"])
def test_multiclass_uses_cross_entropy(backend):
    model = TextClassifier(V, E, H, num_classes=3, backend=backend)
    ids, lengths = _batch()
    logits = model(ids, lengths)
    assert logits.shape == (5, 3)
    labels = torch.tensor([0, 2, 1, 2, 0])
    torch.testing.assert_close(model.loss(logits, labels), nn.functional.cross_entropy(logits, labels))
    assert model.predict(logits).tolist() == logits.argmax(-1).tolist()


def test_padding_idx_embedding_stays_zero():
    model = TextClassifier(V, E, H)
    assert model.embedding.padding_idx == 0
    assert torch.count_nonzero(model.embedding.weight[0]) == 0


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"backend": "cudnn"}, "backend"),
        ({"pooling": "max"}, "pooling"),
        ({"num_classes": 1}, "num_classes"),
        ({"attention": True, "num_heads": 4}, "num_heads"),
    ],
)
def test_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        TextClassifier(V, E, H, **kw)
