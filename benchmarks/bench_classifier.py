"""One training step of the text classifier: torch.nn.LSTM (packed) vs bigmodel.nn.LSTM (lengths=).

The seed classifier: Embedding 100-d -> LSTM 200 -> Linear, batch 64 padded to 256 steps with random
lengths, BCE loss, backward and an Adam step. Everything but the LSTM is the same code in both, so
the ratio is what a user of the model sees. Run through `python -m bigmodel bench --ops classifier`,
or directly:

    python -m pytest benchmarks/bench_classifier.py --benchmark-json=out.json [--device cuda]
"""

import pytest
import torch

from bigmodel.models import TextClassifier

# (name, B, T, vocab, embed, hidden, num_layers, bidirectional)
CASES = [
    ("seed", 64, 256, 10_000, 100, 200, 1, False),
    ("2L-bidir", 32, 256, 10_000, 128, 128, 2, True),
]
IMPLS = {"native": "native", "bigmodel": "fused"}


def _step(model, optimizer, ids, lengths, labels, device):
    def fn():
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(model(ids, lengths), labels)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return fn


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_classifier(time_round, quick, device, case, impl, rnd):
    if quick and case[0] != "seed":
        pytest.skip("--quick runs the seed case only")
    name, B, T, V, E, H, L, bidir = case
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    ids = torch.randint(1, V, (B, T), generator=g)
    ids[torch.arange(T).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    labels = torch.randint(0, 2, (B,), generator=g)

    def build():
        torch.manual_seed(0)
        model = TextClassifier(V, E, H, L, bidir, backend=IMPLS[impl]).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        return _step(model, optimizer, ids.to(device), lengths.to(device), labels.to(device), device)

    time_round(
        build,
        rounds=3 if quick else 7,
        op="classifier",
        case=name,
        shape=f"B={B} T={T} V={V} E={E} H={H} L={L}" + (" bidir" if bidir else ""),
        mode="train-step",
        impl=impl,
        tokens=int(lengths.sum()),
        device=device,
    )
