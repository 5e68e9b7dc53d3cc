"""`bigmodel bench`: run the benchmark suite against native PyTorch and print the table.

Each op family's pytest-benchmark file runs in its own process twice: once as users run PyTorch,
once with glibc's allocator tuned to keep freed blocks (GLIBC_TUNABLES, which must be set before
the process starts). Native and bigmodel run side by side in each process, their rounds alternating
(benchmarks/conftest.py), so every ratio comes from one process and the same stretch of time.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TUNED_MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"
FAMILIES = {"lstm": "bench_lstm.py", "attention": "bench_attention.py", "classifier": "bench_classifier.py"}


def benchmarks_dir() -> Path:
    here = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (here / "bench_lstm.py").is_file():
        raise SystemExit(
            "bigmodel bench: the benchmark files (benchmarks/ in the source tree) were not found next to "
            f"the package (looked in {here}); run it from a source checkout (pip install -e .)"
        )
    return here


def _run_pytest(path: Path, quick: bool, tuned: bool, out_json: Path, device: str = "cpu") -> None:
    env = dict(os.environ)
    # The benchmark process must import the bigmodel this command runs, not whichever one its working
    # directory (benchmarks/) would find through site-packages.
    here = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    if tuned:
        env["GLIBC_TUNABLES"] = TUNED_MALLOC
    else:
        env.pop("GLIBC_TUNABLES", None)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(path),
        "-q",
        "-p",
        "no:cacheprovider",
        f"--benchmark-json={out_json}",
        "--benchmark-disable-gc",
        "--benchmark-sort=name",
        "--benchmark-columns=median,min,max,rounds",
        f"--device={device}",
    ]
    if quick:
        cmd.append("--quick")
    label = "tuned allocator" if tuned else "default allocator"
    print(f"# running {path.name} ({label}) ...", file=sys.stderr, flush=True)
    res = subprocess.run(
        cmd, env=env, cwd=path.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if res.returncode != 0:
        sys.stderr.write(res.stdout)
        raise SystemExit(f"bigmodel bench: {path.name} failed (exit {res.returncode})")


def _medians(path: Path) -> dict[tuple, dict]:
    """Each case and side's median time over its rounds. The suite records one round per benchmark
    (extra_info["round"], native and bigmodel alternating); a file whose benchmarks each time several
    rounds (pytest-benchmark's usual form) gives each side's own median."""
    data = json.loads(path.read_text())
    rows, times = {}, {}
    for b in data["benchmarks"]:
        e = b["extra_info"]
        key = (e["op"], e["case"], e["mode"], e["impl"])
        rows[key] = {"shape": e["shape"], "tokens": e.get("tokens"), "device": e.get("device", "cpu")}
        times.setdefault(key, []).append(b["stats"]["median"] * 1e3)
    for key, row in rows.items():
        row["median_ms"] = statistics.median(times[key])
        row["rounds"] = len(times[key])
    return rows


def build_table(default: dict, tuned: dict | None) -> tuple[str, list[dict]]:
    keys = sorted(
        {k[:3] for k in default}, key=lambda k: list(dict.fromkeys(kk[:3] for kk in default)).index(k)
    )
    header = "| op | case | shape | mode | native ms | bigmodel ms | speedup |"
    sep = "|---|---|---|---|---:|---:|---:|"
    if tuned is not None:
        header += " native ms (tuned malloc) | bigmodel ms (tuned malloc) | speedup vs tuned |"
        sep += "---:|---:|---:|"
    lines, records = [header, sep], []
    for op, case, mode in keys:
        nat, ours = default.get((op, case, mode, "native")), default.get((op, case, mode, "bigmodel"))
        if nat is None or ours is None:
            continue
        rec = {
            "op": op,
            "case": case,
            "shape": nat["shape"],
            "mode": mode,
            "native_ms": nat["median_ms"],
            "bigmodel_ms": ours["median_ms"],
            "speedup": nat["median_ms"] / ours["median_ms"],
        }
        line = (
            f"| {op} | {case} | {nat['shape']} | {mode} | {nat['median_ms']:.1f} | {ours['median_ms']:.1f} "
            f"| {rec['speedup']:.2f}x |"
        )
        if tuned is not None:
            tn, to = tuned.get((op, case, mode, "native")), tuned.get((op, case, mode, "bigmodel"))
            if tn and to:
                rec.update(
                    native_tuned_ms=tn["median_ms"],
                    bigmodel_tuned_ms=to["median_ms"],
                    speedup_tuned=tn["median_ms"] / to["median_ms"],
                )
                line += f" {tn['median_ms']:.1f} | {to['median_ms']:.1f} | {rec['speedup_tuned']:.2f}x |"
            else:
                line += " - | - | - |"
        lines.append(line)
        records.append(rec)
    return "\n".join(lines), records


def machine_line(device: str = "cpu") -> str:
    from .info import cpu_model

    if device == "cuda":
        where = f"GPU {torch.cuda.get_device_name()}"
    else:
        where = f"{torch.get_num_threads()} threads"
    return (
        f"{cpu_model()}, {where}, torch {torch.__version__}, "
        "medians of pytest-benchmark rounds, native and bigmodel alternating"
    )


def _check_devices(rows: dict[tuple, dict], device: str, family_file: str) -> None:
    """A benchmark file that does not take ``--device`` runs on the CPU whatever was asked: say so."""
    ran = sorted({row["device"] for row in rows.values()})
    if ran and ran != [device]:
        raise SystemExit(
            f"bigmodel bench: {family_file} ran on {', '.join(ran)}, not {device} (it does not take --device)"
        )


def plot_speedups(records: list[dict], path: str | Path, title: str) -> None:
    """A bar chart of bigmodel's speedup over native per case (and vs the tuned allocator, if run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['op']} {r['case']}\n{r['mode']}" for r in records]
    series = [("default allocator", [r["speedup"] for r in records])]
    if any("speedup_tuned" in r for r in records):
        series.append(("tuned allocator", [r.get("speedup_tuned", 0.0) for r in records]))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(records) + 2), 4.5))
    for i, (name, values) in enumerate(series):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(records))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, labels=[f"{v:.1f}x" if v else "" for v in values], fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(records)), labels, fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("speedup over native (x)")
    ax.set_title(title, fontsize=8)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _preflight(args) -> str | None:
    """Why the run cannot go, checked before any benchmark runs; None if it can."""
    families = [f.strip() for f in args.ops.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        return f"unknown --ops {unknown}; available: {sorted(FAMILIES)}"
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: CUDA is not available (no GPU visible or a CPU-only torch build)"
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return "--plot needs matplotlib, which is not installed: pip install matplotlib"
    return None


def run_bench(args) -> int:
    problem = _preflight(args)
    if problem is not None:
        print(f"bigmodel bench: {problem}", file=sys.stderr)
        return 2
    families = [f.strip() for f in args.ops.split(",") if f.strip()]
    bdir = benchmarks_dir()
    default, tuned = {}, ({} if args.baseline == "both" else None)
    with tempfile.TemporaryDirectory() as tmp:
        for fam in families:
            path = bdir / FAMILIES[fam]
            out = Path(tmp) / f"{fam}-default.json"
            _run_pytest(path, args.quick, False, out, args.device)
            rows = _medians(out)
            _check_devices(rows, args.device, path.name)
            default.update(rows)
            if tuned is not None:
                out = Path(tmp) / f"{fam}-tuned.json"
                _run_pytest(path, args.quick, True, out, args.device)
                tuned.update(_medians(out))
    table, records = build_table(default, tuned)
    text = f"Machine: {machine_line(args.device)}\n\n{table}\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        machine = machine_line(args.device)
        Path(args.json).write_text(json.dumps({"machine": machine, "results": records}, indent=2))
    if args.plot:
        plot_speedups(records, args.plot, machine_line(args.device))
    return 0


def run_table(args) -> int:
    """`bigmodel table`: the Markdown table from pytest-benchmark JSON files already on disk."""
    rows = {}
    for name in [args.json] + ([args.tuned] if args.tuned else []):
        path = Path(name)
        try:
            rows[name] = _medians(path)
        except (OSError, ValueError, KeyError) as e:
            print(
                f"bigmodel table: {path}: not a pytest-benchmark JSON of bigmodel's benchmarks ({e})",
                file=sys.stderr,
            )
            return 2
    default = rows[args.json]
    tuned = rows[args.tuned] if args.tuned else None
    table, _ = build_table(default, tuned)
    if not table.count("\n") > 1:
        print(
            f"bigmodel table: {args.json}: no case has both a native and a bigmodel result", file=sys.stderr
        )
        return 2
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0
