"""`bigmodel bench`: run the benchmark suite against native PyTorch and print the table.

Each op family's pytest-benchmark file runs in its own process twice: once as users run PyTorch,
once with glibc's allocator tuned to keep freed blocks (GLIBC_TUNABLES, which must be set before
the process starts). Native and bigmodel run side by side in each process, so every ratio comes from
one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TUNED_MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"
FAMILIES = {"lstm": "bench_lstm.py"}


def benchmarks_dir() -> Path:
    here = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (here / "bench_lstm.py").is_file():
        raise SystemExit(
            "bigmodel bench: the benchmark files (benchmarks/ in the source tree) were not found next to "
            f"the package (looked in {here}); run it from a source checkout (pip install -e .)"
        )
    return here


def _run_pytest(path: Path, quick: bool, tuned: bool, out_json: Path) -> None:
    env = dict(os.environ)
    if tuned:
        env["GLIBC_TUNABLES"] = TUNED_MALLOC
    else:
        env.pop("GLIBC_TUNABLES", None)
    cmd = [
        sys.executable, "-m", "pytest", str(path), "-q", "-p", "no:cacheprovider",
        f"--benchmark-json={out_json}", "--benchmark-disable-gc", "--benchmark-sort=name",
        "--benchmark-columns=median,min,max,rounds",
    ]
    if quick:
        cmd.append("--quick")
    label = "tuned allocator" if tuned else "default allocator"
    print(f"# running {path.name} ({label}) ...", file=sys.stderr, flush=True)
    res = subprocess.run(cmd, env=env, cwd=path.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout)
        raise SystemExit(f"bigmodel bench: {path.name} failed (exit {res.returncode})")


def _medians(path: Path) -> dict[tuple, dict]:
    data = json.loads(path.read_text())
    rows = {}
    for b in data["benchmarks"]:
        e = b["extra_info"]
        rows[(e["op"], e["case"], e["mode"], e["impl"])] = {
            "shape": e["shape"], "median_ms": b["stats"]["median"] * 1e3, "tokens": e.get("tokens"),
        }
    return rows


def build_table(default: dict, tuned: dict | None) -> tuple[str, list[dict]]:
    keys = sorted({k[:3] for k in default}, key=lambda k: list(dict.fromkeys(kk[:3] for kk in default)).index(k))
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
            "op": op, "case": case, "shape": nat["shape"], "mode": mode,
            "native_ms": nat["median_ms"], "bigmodel_ms": ours["median_ms"],
            "speedup": nat["median_ms"] / ours["median_ms"],
        }
        line = (
            f"| {op} | {case} | {nat['shape']} | {mode} | {nat['median_ms']:.1f} | {ours['median_ms']:.1f} "
            f"| {rec['speedup']:.2f}x |"
        )
        if tuned is not None:
            tn, to = tuned.get((op, case, mode, "native")), tuned.get((op, case, mode, "bigmodel"))
            if tn and to:
                rec.update(native_tuned_ms=tn["median_ms"], bigmodel_tuned_ms=to["median_ms"],
                           speedup_tuned=tn["median_ms"] / to["median_ms"])
                line += f" {tn['median_ms']:.1f} | {to['median_ms']:.1f} | {rec['speedup_tuned']:.2f}x |"
            else:
                line += " - | - | - |"
        lines.append(line)
        records.append(rec)
    return "\n".join(lines), records


def machine_line() -> str:
    from .info import cpu_model

    return (
        f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"medians of pytest-benchmark rounds"
    )


def run_bench(args) -> int:
    families = [f.strip() for f in args.ops.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        print(f"bigmodel bench: unknown --ops {unknown}; available: {sorted(FAMILIES)}", file=sys.stderr)
        return 2
    bdir = benchmarks_dir()
    default, tuned = {}, ({} if args.baseline == "both" else None)
    with tempfile.TemporaryDirectory() as tmp:
        for fam in families:
            path = bdir / FAMILIES[fam]
            out = Path(tmp) / f"{fam}-default.json"
            _run_pytest(path, args.quick, False, out)
            default.update(_medians(out))
            if tuned is not None:
                out = Path(tmp) / f"{fam}-tuned.json"
                _run_pytest(path, args.quick, True, out)
                tuned.update(_medians(out))
    table, records = build_table(default, tuned)
    text = f"Machine: {machine_line()}\n\n{table}\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_line(), "results": records}, indent=2))
    return 0
