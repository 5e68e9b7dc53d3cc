"""Paired timing of nn.LSTM against bigmodel.nn.LSTM: the two layers alternate call by call.

On a shared, noisy machine a slow stretch of the host moves any median by up to a third, so every
round here times one native call and then one bigmodel call on the same input and weights, as the
suite's rounds alternate (benchmarks/conftest.py): a slow stretch hits both. This probe takes any
shape and round count from the command line. Prints the medians and minima of each side and the
ratio of the medians. Run it once as users run PyTorch and once with glibc's allocator tuned:

    python benchmarks/paired.py                              # seed shape, float32, forward + train
    python benchmarks/paired.py --T 512 --B 32 --I 256 --H 256 --rounds 8
    python benchmarks/paired.py --layers 2 --bidirectional --B 32 --I 256 --H 256 --rounds 5
    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184 \\
        python benchmarks/paired.py --dtype bfloat16
"""

import argparse
import statistics
import time

import torch
from torch import nn

import bigmodel.nn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=256, help="time steps (default 256)")
    ap.add_argument("--B", type=int, default=64, help="batch (default 64)")
    ap.add_argument("--I", type=int, default=100, help="input size (default 100)")
    ap.add_argument("--H", type=int, default=200, help="hidden size (default 200)")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--bidirectional", action="store_true")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--rounds", type=int, default=15, help="timed pairs per mode (default 15)")
    ap.add_argument("--modes", default="forward,train", help="comma-separated: forward, train")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in ("forward", "train"):
            ap.error(f"--modes: unknown mode {m!r} (expected forward and/or train)")
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    kwargs = dict(num_layers=args.layers, bidirectional=args.bidirectional, dtype=dtype)
    native = nn.LSTM(args.I, args.H, **kwargs)
    ours = bigmodel.nn.LSTM(args.I, args.H, **kwargs)
    ours.load_state_dict(native.state_dict())
    x = torch.randn(args.T, args.B, args.I, dtype=dtype, requires_grad=True)

    def forward(model):
        with torch.no_grad():
            model(x)

    def train(model):
        for p in model.parameters():
            p.grad = None
        x.grad = None
        out, _ = model(x)
        out.float().sum().backward()

    print(
        f"T={args.T} B={args.B} I={args.I} H={args.H} layers={args.layers} "
        f"bidirectional={args.bidirectional} {args.dtype}, {torch.get_num_threads()} threads, "
        f"{args.rounds} alternating pairs"
    )
    for mode in modes:
        fn = forward if mode == "forward" else train
        times = {"native": [], "bigmodel": []}
        for model in (native, ours, native, ours):  # warm-up: caches, packed weights, allocator
            fn(model)
        for _ in range(args.rounds):
            for name, model in (("native", native), ("bigmodel", ours)):
                start = time.perf_counter()
                fn(model)
                times[name].append((time.perf_counter() - start) * 1e3)
        n, b = statistics.median(times["native"]), statistics.median(times["bigmodel"])
        print(
            f"{mode:8s} native {n:8.1f} ms (min {min(times['native']):.1f})   "
            f"bigmodel {b:8.1f} ms (min {min(times['bigmodel']):.1f})   speedup {n / b:.2f}x"
        )


if __name__ == "__main__":
    main()
