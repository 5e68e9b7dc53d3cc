"""`bigmodel table`: pytest-benchmark JSON on disk -> the README's Markdown table."""

import json

from bigmodel.cli.main import main


def _bench_json(path, rows):
    benchmarks = [
        {
            "extra_info": {"op": "lstm", "case": case, "shape": "T=4 B=2", "mode": mode, "impl": impl},
            "stats": {"median": ms / 1e3},
        }
        for case, mode, impl, ms in rows
    ]
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    return path


def test_table_from_default_and_tuned_json(tmp_path, capsys):
    default = _bench_json(
        tmp_path / "d.json",
        [("seed", "train", "native", 200.0), ("seed", "train", "bigmodel", 100.0)],
    )
    tuned = _bench_json(
        tmp_path / "t.json",
        [("seed", "train", "native", 150.0), ("seed", "train", "bigmodel", 100.0)],
    )
    md = tmp_path / "table.md"
    assert main(["table", str(default), "--tuned", str(tuned), "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| lstm | seed"))
    assert "| 200.0 | 100.0 | 2.00x |" in row
    assert "| 150.0 | 100.0 | 1.50x |" in row
    assert md.read_text().strip() == out.strip()


def test_table_rejects_a_file_that_is_not_benchmark_json(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["table", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.json" in err


def test_table_needs_both_sides_of_a_case(tmp_path, capsys):
    only_native = _bench_json(tmp_path / "n.json", [("seed", "forward", "native", 10.0)])
    assert main(["table", str(only_native)]) == 2
    assert "no case has both" in capsys.readouterr().err


def test_table_takes_each_sides_median_over_its_rounds(tmp_path, capsys):
    """The suite records one benchmark per round (native and bigmodel alternating): each side's time
    is the median of its rounds, however many there are."""
    rounds = [("seed", "train", "native", ms) for ms in (200.0, 500.0, 180.0)]
    rounds += [("seed", "train", "bigmodel", ms) for ms in (100.0, 90.0, 95.0, 400.0, 80.0)]
    path = _bench_json(tmp_path / "rounds.json", rounds)
    assert main(["table", str(path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| lstm | seed"))
    assert "| 200.0 | 95.0 | 2.11x |" in row
