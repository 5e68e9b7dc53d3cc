import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigmodel.cli.bench import build_table, plot_speedups
from bigmodel.cli.main import main


def _rows(native_ms, ours_ms):
    row = {"shape": "T=8", "tokens": 8, "device": "cpu"}
    return {
        ("classifier", "seed", "train-step", "native"): {**row, "median_ms": native_ms},
        ("classifier", "seed", "train-step", "bigmodel"): {**row, "median_ms": ours_ms},
    }


def test_unknown_ops(capsys):
    assert main(["bench", "--ops", "lstm,gru"]) == 2
    assert "unknown --ops ['gru']" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_missing_is_a_clear_error(capsys):
    assert main(["bench", "--ops", "classifier", "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main(["bench", "--ops", "classifier", "--plot", str(tmp_path / "s.png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    table, records = build_table(_rows(30.0, 10.0), _rows(24.0, 8.0))
    assert "| classifier | seed | T=8 | train-step | 30.0 | 10.0 | 3.00x |" in table
    assert records[0]["speedup"] == pytest.approx(3.0)
    path = tmp_path / "speedups.png"
    plot_speedups(records, path, "test machine")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_suite_alternates_native_and_bigmodel_round_by_round():
    """Each case's rounds run in a row, native and bigmodel taking turns, so that a slow stretch of a
    shared host falls on both sides of a ratio."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "bench_lstm.py",
            "--collect-only",
            "-q",
            "--quick",
            "-p",
            "no:cacheprovider",
        ],
        cwd=root / "benchmarks",
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ids = [
        line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "bench_lstm.py::test_lstm[" in line
    ]
    assert ids[:5] == [
        "r0-seed-forward-native",
        "r0-seed-forward-bigmodel",
        "r1-seed-forward-native",
        "r1-seed-forward-bigmodel",
        "r2-seed-forward-native",
    ]
    cases = [i.split("-", 1)[1].rsplit("-", 1)[0] for i in ids]
    # a case's rounds are contiguous: once the suite leaves a case it never comes back to it
    assert len(set(cases)) == len([case for case, _ in itertools.groupby(cases)])
