import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigmodel.cli.train import CHECKPOINT_NAME, weights_digest
from bigmodel.models import TextClassifier

REPO = Path(__file__).resolve().parents[2]


def test_synthetic_corpus_two_epochs_reach_90_percent(tmp_path, train, read_json):
    out = tmp_path / "result.json"
    rc = train(
        "--epochs",
        "2",
        "--embed-dim",
        "32",
        "--hidden-dim",
        "64",
        "--lr",
        "0.003",
        "--threads",
        "1",
        "--json",
        out,
    )
    assert rc == 0
    epochs = read_json(out)["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert set(epochs[0]) == {"epoch", "loss", "accuracy", "epoch_seconds", "tokens_per_second"}
    assert epochs[-1]["accuracy"] >= 0.90
    assert epochs[-1]["loss"] < epochs[0]["loss"]


def test_fused_and_native_follow_the_same_loss_curve(small_corpus, tmp_path, train, tiny, read_json):
    runs = {}
    for backend in ("fused", "native"):
        out = tmp_path / f"{backend}.json"
        assert train("--data", small_corpus, "--epochs", "2", *tiny, "--backend", backend, "--json", out) == 0
        runs[backend] = read_json(out)["epochs"]
    for fused, native in zip(runs["fused"], runs["native"], strict=True):
        assert fused["loss"] == pytest.approx(native["loss"], rel=1e-5)
        assert fused["accuracy"] == pytest.approx(native["accuracy"], abs=1 / 40 + 1e-9)


def _checkpoint(out_dir):
    return torch.load(out_dir / CHECKPOINT_NAME, weights_only=True)


def test_resume_continues_exactly(small_corpus, tmp_path, train, tiny, read_json):
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = ("--data", small_corpus, *tiny, "--dropout", "0.3")
    assert train(*args, "--epochs", "2", "--out", straight, "--json", tmp_path / "a.json") == 0
    assert train(*args, "--epochs", "1", "--out", split) == 0
    assert _checkpoint(split)["epoch"] == 1
    # On resume the run settings come from the checkpoint; restating them is allowed.
    assert (
        train("--epochs", "2", "--out", split, "--resume", "--threads", "1", "--json", tmp_path / "b.json")
        == 0
    )
    a, b = _checkpoint(straight), _checkpoint(split)
    assert a["epoch"] == b["epoch"] == 2
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["history"][1]["loss"] == b["history"][1]["loss"]
    ja, jb = read_json(tmp_path / "a.json"), read_json(tmp_path / "b.json")
    assert ja["weights_sha256"] == jb["weights_sha256"]
    assert [e["loss"] for e in ja["epochs"]] == [e["loss"] for e in jb["epochs"]]


def test_amp_trains_and_is_part_of_the_run(tmp_path, train, read_json, capsys):
    """--amp (bfloat16 autocast) still learns the synthetic corpus, is saved with the run, and a
    resume that contradicts it is refused."""
    out, run = tmp_path / "amp.json", tmp_path / "run"
    args = ("--embed-dim", "32", "--hidden-dim", "64", "--lr", "0.003", "--threads", "1")
    assert train("--epochs", "2", *args, "--amp", "--out", run, "--json", out) == 0
    assert read_json(out)["epochs"][-1]["accuracy"] >= 0.90
    assert _checkpoint(run)["config"]["amp"] is True
    assert train("--epochs", "3", "--out", run, "--resume", "--no-amp") == 2
    assert "--amp False (checkpoint: True)" in capsys.readouterr().err


def test_checkpoint_without_amp_setting_resumes(small_corpus, tmp_path, train, tiny):
    """A checkpoint written before --amp existed resumes as a run without it."""
    out = tmp_path / "run"
    assert train("--data", small_corpus, *tiny, "--epochs", "1", "--out", out) == 0
    ckpt = _checkpoint(out)
    del ckpt["config"]["amp"]
    torch.save(ckpt, out / CHECKPOINT_NAME)
    assert train("--epochs", "2", "--out", out, "--resume", "--threads", "1") == 0
    assert _checkpoint(out)["config"]["amp"] is False


def test_resume_into_the_other_backend(small_corpus, tmp_path, train, tiny):
    out = tmp_path / "run"
    assert train("--data", small_corpus, *tiny, "--epochs", "1", "--out", out, "--backend", "fused") == 0
    assert train("--epochs", "2", "--out", out, "--resume", "--backend", "native", "--threads", "1") == 0
    assert _checkpoint(out)["epoch"] == 2


def test_checkpoint_loads_weights_only_into_a_classifier(small_corpus, tmp_path, train, tiny, read_json):
    out = tmp_path / "run"
    assert (
        train("--data", small_corpus, *tiny, "--epochs", "1", "--out", out, "--json", tmp_path / "r.json")
        == 0
    )
    ckpt = _checkpoint(out)
    model = TextClassifier(len(ckpt["vocab"]), 8, 8, backend="native")
    model.load_state_dict(ckpt["model"])
    assert read_json(tmp_path / "r.json")["weights_sha256"] == [weights_digest(model)]
    assert [p.name for p in out.iterdir()] == [CHECKPOINT_NAME]  # no temporary files left


def _torchrun_train(*args) -> subprocess.CompletedProcess:
    """`bigmodel train ARGS` as two torchrun workers (gloo, one thread each)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "bigmodel", "train", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_two_processes_end_with_identical_weights(small_corpus, tmp_path, train, tiny, read_json):
    out = tmp_path / "result.json"
    res = _torchrun_train(
        "--data", small_corpus, *tiny, "--epochs", "2", "--out", tmp_path / "run", "--json", out
    )
    assert res.returncode == 0, res.stdout + res.stderr
    result = read_json(out)
    assert result["world_size"] == 2
    first, second = result["weights_sha256"]
    assert first == second
    assert len(result["epochs"]) == 2
    # rank 0 alone logged the epochs
    assert res.stdout.count("epoch 2/2") == 1
    ckpt = _checkpoint(tmp_path / "run")
    model = TextClassifier(len(ckpt["vocab"]), 8, 8)
    model.load_state_dict(ckpt["model"])
    assert weights_digest(model) == first


def test_torchrun_worker_keeps_its_exit_code(tmp_path, tiny):
    """torchrun workers of `bigmodel train` end without the interpreter's finalization (gloo's
    teardown aborted a rank there, rarely): a data error must still reach torchrun as exit code 2
    from every rank, with the rank-prefixed one-line message."""
    res = _torchrun_train("--data", tmp_path / "missing", *tiny, "--out", tmp_path / "run")
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    for rank in (0, 1):
        assert f"[rank {rank}] bigmodel train: error:" in out, out
    assert "exitcode  : 2" in out, out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0, float("nan")], ids=["small", "near", "clipped", "nan"])
def test_clip_gradients_is_clip_grad_norm(scale):
    """The loop's clipping skips the multiply only where clip_grad_norm_'s is by exactly 1: the same
    gradients bit for bit (clipped, not clipped, a NaN norm), parameters without a gradient skipped."""
    from bigmodel.cli.train import _clip_gradients

    torch.manual_seed(0)
    nets = [
        torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.Linear(20, 1), torch.nn.Linear(3, 3))
        for _ in "ab"
    ]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(8, 30) * scale
    for net in nets:
        net[1](net[0](x)).square().sum().backward()  # net[2] gets no gradient
    torch.nn.utils.clip_grad_norm_(nets[0].parameters(), 5.0)
    _clip_gradients(nets[1].parameters(), 5.0)
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert (a.grad is None and b.grad is None) or torch.equal(
            a.grad.nan_to_num(7.0), b.grad.nan_to_num(7.0)
        )
    if scale == 100.0:  # the case clipped
        norm = torch.nn.utils.get_total_norm([p.grad for p in nets[1].parameters() if p.grad is not None])
        torch.testing.assert_close(norm, torch.tensor(5.0))
