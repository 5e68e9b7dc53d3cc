"""F.scaled_dot_product_attention and nn.MultiheadAttention vs bigmodel's, side by side.

    python -m pytest benchmarks/bench_attention.py --benchmark-json=out.json [--quick] [--device cuda]

CPU: float32 at the CPU shapes, and bfloat16 in the modes forward-bf16 and train-bf16. CUDA:
bfloat16 at the GPU shapes (native without a mask or with is_causal is SDPA's flash backend; with a
boolean mask PyTorch picks its memory-efficient backend).
Key padding: native gets the equivalent boolean attn_mask, bigmodel gets key_lengths (its padded
key blocks are skipped). Dropout (p = 0.1; each side draws its own mask) and bias (a float [1, heads,
L, L] attn_mask, learned in training: a relative-position bias, whose gradient both sides compute):
CPU seed shape only, not in --quick. On CUDA every timed call ends with a synchronize.
"""

import pytest
import torch
import torch.nn.functional as F

import bigmodel.nn
import bigmodel.nn.functional as BF

# (name, B, L, heads, d)
SHAPES = [
    ("seed", 32, 256, 8, 32),
    ("short", 64, 32, 8, 32),  # short sentences (the classifier's attention over MR-length inputs)
    ("long", 8, 1024, 8, 32),
    ("longer", 4, 2048, 8, 64),
    ("wide", 4, 512, 8, 128),  # head dim 128, as in most large language models
    ("d40", 8, 512, 8, 40),  # a head dim that is no multiple of 16 (Stable Diffusion's 320 channels / 8)
]
GPU_SHAPES = [
    ("gpu-d64", 8, 4096, 16, 64),
    ("gpu-d128", 8, 4096, 16, 128),
]
GPU_DTYPE = torch.bfloat16
MASKS = ["none", "causal", "key-padding", "dropout", "bias"]  # dropout (p = 0.1), bias: seed shape only
MODES = ["forward", "train", "forward-bf16", "train-bf16"]  # *-bf16: CPU only (CUDA is bf16 throughout)
IMPLS = ["native", "bigmodel"]


def _call(impl, q, k, v, mask, lengths, bias=None):
    if mask == "bias":
        kwargs = {"attn_mask": bias}
    elif mask == "causal":
        kwargs = {"is_causal": True}
    elif mask == "dropout":
        kwargs = {"dropout_p": 0.1}
    elif mask == "key-padding":
        L = k.shape[2]
        bool_mask = torch.arange(L, device=k.device) < lengths.view(-1, 1, 1, 1)
        kwargs = {"attn_mask": bool_mask} if impl == "native" else {"key_lengths": lengths}
    else:
        kwargs = {}
    if impl == "native":
        return lambda: F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=kwargs.get("attn_mask"),
            is_causal=kwargs.get("is_causal", False),
            dropout_p=kwargs.get("dropout_p", 0.0),
        )
    return lambda: BF.scaled_dot_product_attention(q, k, v, **kwargs)


def _measure(time_round, build, quick, *, slow, **info):
    """Times one round of `build()`'s callable with the suite's round counts and records `info` for
    `bigmodel bench`'s table."""
    time_round(build, rounds=(3 if slow else 5) if quick else (7 if slow else 15), **info)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", SHAPES + GPU_SHAPES, ids=[s[0] for s in SHAPES + GPU_SHAPES])
def test_attention(time_round, quick, device, timed, shape, mask, mode, impl, rnd):
    on_gpu_list = shape in GPU_SHAPES
    if on_gpu_list != (device == "cuda"):
        pytest.skip("CPU shapes run on the CPU, GPU shapes on CUDA")
    if quick and shape[0] not in ("seed", "gpu-d64"):
        pytest.skip("--quick runs the first shape only")
    if mask in ("dropout", "bias") and (quick or shape[0] != "seed"):
        pytest.skip(f"{mask}: CPU seed shape only, not in --quick (native runs its L x L math path)")
    if impl == "bigmodel" and device == "cuda" and not _has_cuda_kernel():
        pytest.skip("bigmodel was built without its CUDA attention kernel")
    if mode.endswith("-bf16") and device == "cuda":
        pytest.skip("on CUDA every mode is bf16 already")
    name, B, L, H, d = shape
    dtype = GPU_DTYPE if device == "cuda" or mode.endswith("-bf16") else torch.float32

    def build():
        g = torch.Generator().manual_seed(1)
        q, k, v = (
            torch.randn(B, H, L, d, generator=g).to(device, dtype).requires_grad_(mode.startswith("train"))
            for _ in range(3)
        )
        # Lengths between L/4 and L, the longest present (so no row is fully masked for native).
        lengths = torch.randint(L // 4, L + 1, (B,), generator=g)
        lengths[0] = L
        lengths = lengths.to(device)
        bias = None
        if mask == "bias":
            bias = (
                (0.1 * torch.randn(1, H, L, L, generator=g))
                .to(device, dtype)
                .requires_grad_(mode.startswith("train"))
            )
        attend = _call(impl, q, k, v, mask, lengths, bias)

        if mode.startswith("forward"):

            def fn():
                with torch.no_grad():
                    attend()
        else:

            def fn():
                q.grad = k.grad = v.grad = None
                if bias is not None:
                    bias.grad = None
                attend().sum().backward()

        return timed(fn)

    _measure(
        time_round,
        build,
        quick,
        slow=mode.startswith("train") or L >= 1024,
        op="attention",
        case=f"{name}/{mask}",
        shape=f"B={B} L={L} heads={H} d={d}" + (" bf16" if dtype == torch.bfloat16 else ""),
        mode=mode,
        impl=impl,
        device=device,
    )


# Decoding with a KV cache: one new query row per sequence against every cached key, 32 calls (tokens)
# per timed round; key-padding gives each sequence its own cache length.
DECODE_SHAPE = ("decode", 8, 1024, 8, 64)  # (name, B, cached keys, heads, d)
DECODE_STEPS = 32


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["forward", "forward-bf16"])
@pytest.mark.parametrize("mask", ["none", "key-padding"])
def test_attention_decode(time_round, quick, device, timed, mask, mode, impl, rnd):
    if device == "cuda":
        pytest.skip("a CPU serving case")
    name, B, S, H, d = DECODE_SHAPE
    dtype = torch.bfloat16 if mode.endswith("-bf16") else torch.float32

    def build():
        g = torch.Generator().manual_seed(1)
        q = torch.randn(B, H, 1, d, generator=g).to(dtype)
        k, v = (torch.randn(B, H, S, d, generator=g).to(dtype) for _ in range(2))
        lengths = torch.randint(S // 4, S + 1, (B,), generator=g)
        lengths[0] = S
        attend = _call(impl, q, k, v, mask, lengths)

        def fn():
            with torch.no_grad():
                for _ in range(DECODE_STEPS):
                    attend()

        return timed(fn)

    _measure(
        time_round,
        build,
        quick,
        slow=False,
        op="attention",
        case=f"{name}/{mask}",
        shape=f"B={B} 1 query x {S} keys heads={H} d={d}, {DECODE_STEPS} calls"
        + (" bf16" if mode.endswith("-bf16") else ""),
        mode=mode,
        impl=impl,
        device=device,
    )


def _has_cuda_kernel() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("bigmodel::attention", "CUDA")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("weights", [False, True], ids=["", "weights"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_multihead_attention(time_round, quick, device, timed, shape, weights, mode, impl, rnd):
    """nn.MultiheadAttention vs bigmodel's, self-attention with a right-padded key_padding_mask,
    need_weights=False on both sides, or (case `+weights`, seed and short shapes) need_weights=True,
    the module's default, returning the head-averaged weights (training backpropagates the output
    only, as a model that logs or inspects its weights does). Both modules stay in train mode
    (dropout 0): the issue takes native's train mode as the baseline, since its eval fast path is
    slower on this CPU. On CUDA the modules run in bfloat16 (the tensor-core path); on the CPU the
    *-bf16 modes do."""
    if quick and shape[0] != "seed":
        pytest.skip("--quick runs the seed shape only")
    if weights and (shape[0] not in ("seed", "short") or (quick and mode.endswith("-bf16"))):
        pytest.skip("need_weights rows: seed and short shapes (--quick: float32)")
    if weights and impl == "bigmodel" and device == "cuda":
        pytest.skip("bigmodel's attention_weights has no CUDA kernel (the module takes PyTorch's path)")
    if impl == "bigmodel" and device == "cuda" and not _has_cuda_kernel():
        pytest.skip("bigmodel was built without its CUDA attention kernel")
    if mode.endswith("-bf16") and device == "cuda":
        pytest.skip("on CUDA every mode is bf16 already")
    dtype = GPU_DTYPE if device == "cuda" or mode.endswith("-bf16") else torch.float32
    name, B, L, H, d = shape
    E = H * d

    def build():
        torch.manual_seed(0)
        ref = torch.nn.MultiheadAttention(E, H, batch_first=True)
        if impl == "native":
            module = ref
        else:
            module = bigmodel.nn.MultiheadAttention(E, H, batch_first=True)
            module.load_state_dict(ref.state_dict())
        module = module.to(device, dtype).train()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(B, L, E, generator=g).to(device, dtype).requires_grad_(mode.startswith("train"))
        lengths = torch.randint(L // 4, L + 1, (B,), generator=g)
        lengths[0] = L
        pad = (torch.arange(L) >= lengths.view(-1, 1)).to(device)  # True = padding, as nn.MHA wants
        params = list(module.parameters())

        if mode.startswith("forward"):

            def fn():
                with torch.no_grad():
                    module(x, x, x, key_padding_mask=pad, need_weights=weights)
        else:

            def fn():
                for p in params:
                    p.grad = None
                x.grad = None
                out, _ = module(x, x, x, key_padding_mask=pad, need_weights=weights)
                out.sum().backward()

        return timed(fn)

    _measure(
        time_round,
        build,
        quick,
        slow=mode.startswith("train") or L >= 1024,
        op="mha",
        case=f"{name}/key-padding" + ("+weights" if weights else ""),
        shape=f"B={B} L={L} E={E} heads={H}" + (" bf16" if dtype == torch.bfloat16 else ""),
        mode=mode,
        impl=impl,
        device=device,
    )
