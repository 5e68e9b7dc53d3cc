"""Entry point of the `bigmodel` command (also `python -m bigmodel`)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bigmodel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="version, torch, kernels built, CPU ISA and CUDA archs")

    from .train import add_train_arguments

    train = sub.add_parser(
        "train",
        help="train the text classifier (under torchrun: DistributedDataParallel)",
        description="Train bigmodel.models.TextClassifier on a corpus, testing after each epoch.",
    )
    add_train_arguments(train)

    bench = sub.add_parser("bench", help="benchmark bigmodel against native PyTorch, print a Markdown table")
    bench.add_argument("--quick", action="store_true", help="seed shape only, fewer rounds")
    bench.add_argument(
        "--ops",
        default="lstm,attention",
        help="comma-separated op families: lstm, attention, classifier (default: lstm,attention)",
    )
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (default: cpu)")
    bench.add_argument("--plot", metavar="FILE.png", help="also draw the speedups (needs matplotlib)")
    bench.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    bench.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    bench.add_argument(
        "--baseline",
        choices=["both", "default"],
        default="both",
        help="'both' also runs a second process with glibc's allocator tuned (default: both)",
    )

    table = sub.add_parser(
        "table",
        help="turn pytest-benchmark JSON from the benchmark files into the Markdown table",
        description="Build the native-vs-bigmodel table from `pytest benchmarks/... --benchmark-json=F`.",
    )
    table.add_argument("json", metavar="JSON", help="pytest-benchmark JSON (default allocator)")
    table.add_argument("--tuned", metavar="JSON", help="the same run with glibc's allocator tuned")
    table.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")

    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import run_info

        return run_info()
    if args.command == "train":
        from .train import launched_world_size, run_train, torchrun_worker_exit

        code = run_train(args)
        if argv is None and launched_world_size() > 1:
            torchrun_worker_exit(code)  # a torchrun worker process: no finalization
        return code
    if args.command == "bench":
        from .bench import run_bench

        return run_bench(args)
    if args.command == "table":
        from .bench import run_table

        return run_table(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
