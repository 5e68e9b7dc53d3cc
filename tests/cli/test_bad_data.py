"""Bad data and bad checkpoints: exit code 2, one line on stderr saying what and where, nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigmodel.cli.train import CHECKPOINT_NAME


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def expect_error(train, capsys, tmp_path):
    """Runs `bigmodel train ARGS`; checks exit 2, one error line holding each needle, no file changed."""

    def check(args, *needles: str) -> None:
        before = _snapshot(tmp_path)
        capsys.readouterr()
        assert train(*args) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("bigmodel train: error: ")
        for needle in needles:
            assert needle in lines[0], lines[0]
        assert _snapshot(tmp_path) == before

    return check


@pytest.fixture
def outputs(tmp_path, tiny):
    """Arguments that would write a JSON file and a checkpoint if training started."""
    return ["--json", tmp_path / "result.json", "--out", tmp_path / "run", *tiny, "--epochs", "1"]


def test_missing_path(tmp_path, expect_error, outputs):
    missing = tmp_path / "no-such-corpus"
    expect_error(["--data", missing, *outputs], str(missing), "no such file")
    assert not (tmp_path / "result.json").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("fmt", ["polarity", "csv"])
def test_empty_corpus(tmp_path, expect_error, outputs, fmt):
    if fmt == "polarity":
        data = tmp_path / "mr"
        data.mkdir()
        (data / "x.pos").write_text("")
        (data / "x.neg").write_text("\n")
    else:
        data = tmp_path / "r.csv"
        data.write_text("text,label\n")
    expect_error(["--data", data, "--format", fmt, *outputs], str(data), "empty")


def test_aclimdb_file_not_utf8(tmp_path, expect_error, outputs):
    root = tmp_path / "aclImdb"
    for split in ("train", "test"):
        for name in ("pos", "neg"):
            (root / split / name).mkdir(parents=True)
            (root / split / name / "0_1.txt").write_text("fine words")
    bad = root / "test" / "pos" / "0_1.txt"
    bad.write_bytes(b"\xff\xfebad")
    expect_error(["--data", root, *outputs], str(bad), "not valid UTF-8")


def test_csv_not_utf8(tmp_path, expect_error, outputs):
    data = tmp_path / "r.csv"
    data.write_bytes(b"text,label\ngood,pos\n\x93bad\x94,neg\n")
    expect_error(["--data", data, *outputs], str(data), "not valid UTF-8")


def test_unknown_label(tmp_path, expect_error, outputs):
    data = tmp_path / "r.csv"
    data.write_text("text,label\ngood,pos\nbad,neg\nmeh,3\n")
    expect_error(["--data", data, *outputs], f"{data}, line 4", "'3'")


@pytest.fixture
def trained(small_corpus, tmp_path, train, tiny):
    """A run directory holding a 1-epoch checkpoint of the tiny model."""
    out = tmp_path / "run"
    assert train("--data", small_corpus, *tiny, "--epochs", "1", "--out", out) == 0
    return out


def test_corrupt_checkpoint(trained, tmp_path, expect_error):
    ckpt = trained / CHECKPOINT_NAME
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    expect_error(
        ["--out", trained, "--resume", "--epochs", "2", "--json", tmp_path / "r.json"], str(ckpt), "corrupt"
    )


def test_not_a_checkpoint(trained, expect_error):
    ckpt = trained / CHECKPOINT_NAME
    torch.save({"weights": torch.zeros(3)}, ckpt)
    expect_error(["--out", trained, "--resume", "--epochs", "2"], str(ckpt), "not a bigmodel")


def test_checkpoint_of_another_model(trained, expect_error):
    args = ["--out", trained, "--resume", "--epochs", "2", "--hidden-dim", "16"]
    expect_error(args, str(trained / CHECKPOINT_NAME), "--hidden-dim 16 (checkpoint: 8)")


def test_checkpoint_whose_weights_do_not_fit(trained, expect_error):
    path = trained / CHECKPOINT_NAME
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["lstm.weight_hh_l0"] = torch.zeros(3, 3)
    torch.save(ckpt, path)
    expect_error(["--out", trained, "--resume", "--epochs", "2"], str(path), "does not fit")


def test_existing_checkpoint_is_not_overwritten_without_resume(trained, small_corpus, tiny, expect_error):
    expect_error(
        ["--data", small_corpus, *tiny, "--epochs", "1", "--out", trained],
        str(trained / CHECKPOINT_NAME),
        "--resume",
    )


def test_resume_without_checkpoint(tmp_path, expect_error):
    expect_error(["--out", tmp_path / "empty", "--resume"], str(tmp_path / "empty"), "no checkpoint")


def test_the_console_command_exits_2(tmp_path):
    missing = tmp_path / "missing.csv"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "bigmodel",
            "train",
            "--data",
            str(missing),
            "--json",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert res.stderr.strip() == f"bigmodel train: error: {missing}: no such file or directory"
    assert list(tmp_path.iterdir()) == []
