"""`bigmodel info`: what this installation is and what it was compiled for."""

from __future__ import annotations

import platform

import torch

import bigmodel


def build_info() -> dict[str, str]:
    text = torch.ops.bigmodel.build_info()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def kernels() -> dict[str, list[str]]:
    """Each bigmodel op and the devices it has a kernel for."""
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("bigmodel::"))
    out = {}
    for name in names:
        devices = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(name, k)]
        if devices:
            out[name.split("::", 1)[1]] = devices
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_info() -> int:
    info = build_info()
    print(f"bigmodel {bigmodel.__version__}")
    print(
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), python {platform.python_version()}"
    )
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads")
    print(f"compiled for CPU: -march={info.get('cpu_arch')} (at::vec {info.get('cpu_capability')})")
    if info.get("cuda") == "1":
        print(f"compiled for CUDA: {info.get('cuda_archs')}")
    else:
        print("compiled for CUDA: no (CPU-only build)")
    has = [
        name
        for key, name in (
            ("cpu_amx_bf16", "AMX-BF16"),
            ("cpu_avx512", "AVX-512"),
            ("cpu_avx512_bf16", "AVX512-BF16"),
            ("cpu_avx2", "AVX2"),
        )
        if info.get(key) == "1"
    ]
    print(
        f"CPU kernels: BIGMODEL_CPU_KERNEL={info.get('cpu_kernel', 'unknown')} "
        f"(this CPU has {', '.join(has) or 'neither AVX2 nor AVX-512'}; 'auto' picks the widest)"
    )
    if "cpu_bf16_dot_pays" in info and info.get("cpu_amx_bf16") != "1":
        fma, dot = float(info["cpu_fma_gflops"]), float(info["cpu_bf16_dot_gflops"])
        tiles = "vdpbf16ps" if info["cpu_bf16_dot_pays"] == "1" else "float32 FMA"
        print(
            f"bf16 LSTM and attention, forward and backward, without AMX: {tiles} tiles "
            f"(measured per thread: FMA {fma:.0f} GFLOP/s, vdpbf16ps {dot:.0f} GFLOP/s)"
        )
    elif info.get("cpu_avx2") == "1" and info.get("cpu_avx512") != "1":
        print(
            "bf16 without AVX-512: LSTM layers on the AVX2 float32 tiles over bf16 storage, "
            "attention on float32 copies (decoding reads bf16 K and V in place)"
        )
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
    print(f"GPU: {gpu}")
    print("kernels:")
    for op, devices in kernels().items():
        print(f"  {op:24s} {', '.join(devices)}")
    return 0
