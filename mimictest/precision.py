"""Choosing bf16 autocast by measurement: ``BF16 = "auto"``.

On CUDA, bf16 is used where the GPU supports it. On a CPU the answer depends on the chip: with
AMX-BF16 a bf16 matmul runs about 7x faster than fp32; with AVX512-BF16 (AMD Zen 4/5) about 3x;
on an AVX2-only CPU bf16 is emulated and over 100x slower. So "auto" times a 1024^3 matmul in
both precisions with this process's threads, uses bf16 only when it is faster, and caches the
measurement per CPU model, instruction flags, thread count and torch version in
``~/.cache/mimictest/precision.json`` (``MIMICTEST_CACHE`` overrides the folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time

import torch

from mimictest.atomic import write_json

_SIZE, _REPEATS = 1024, 3


def cpu_model() -> tuple[str, list[str]]:
    """The CPU's model name and its matmul-relevant instruction flags (AMX, AVX-512 BF16, AVX-512, AVX2)."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:  # not Linux
        pass
    name = name or platform.processor() or "unknown CPU"
    wanted = ["amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2"]
    return name, [f for f in wanted if f in flags]


def cpu_description() -> str:
    """``"AMD EPYC (avx2), 2 logical cores"``: the CPU model, its matmul-relevant flags and core count."""
    name, flags = cpu_model()
    return f"{name} ({', '.join(flags) or 'no AVX2'}), {os.cpu_count()} logical cores"


def _matmul_seconds(dtype: torch.dtype) -> float:
    a = torch.randn(_SIZE, _SIZE, generator=torch.Generator().manual_seed(0)).to(dtype)
    b = a.t().contiguous()
    a @ b  # warm-up: the first call picks and may JIT the kernel
    start = time.perf_counter()
    for _ in range(_REPEATS):
        a @ b
    return (time.perf_counter() - start) / _REPEATS


def measure_cpu() -> dict:
    """GFLOP/s of a 1024^3 matmul in fp32 and bf16 on this CPU, with the current thread count."""
    flops = 2 * _SIZE**3
    fp32, bf16 = _matmul_seconds(torch.float32), _matmul_seconds(torch.bfloat16)
    name, flags = cpu_model()
    return {"cpu": name, "flags": flags, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "fp32_gflops": flops / fp32 / 1e9, "bf16_gflops": flops / bf16 / 1e9}


def _cache_file() -> str:
    folder = os.environ.get("MIMICTEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mimictest"))
    return os.path.join(folder, "precision.json")


def cpu_measurement() -> dict:
    """``measure_cpu()``, read from the cache when this CPU, thread count and torch were measured before."""
    name, flags = cpu_model()
    key = hashlib.sha1(json.dumps([name, flags, torch.get_num_threads(), torch.__version__]).encode()).hexdigest()[:16]
    path = _cache_file()
    try:
        with open(path) as fh:
            cache = json.load(fh)
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = measure_cpu()
        write_json(path, cache)
    return cache[key]


def resolve_bf16(setting: bool | str, device: torch.device) -> tuple[bool, str]:
    """``(use bf16, why)`` for ``BF16 = True | False | "auto"`` on ``device``."""
    if isinstance(setting, bool):
        return setting, f"BF16 = {setting} (forced)"
    if setting != "auto":
        raise ValueError(f"BF16 must be True, False or 'auto', got {setting!r}")
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"BF16 = 'auto': {torch.cuda.get_device_name(device)} {'supports' if ok else 'lacks'} bf16"
    if device.type != "cpu":
        return False, f"BF16 = 'auto': fp32 on {device.type}"
    m = cpu_measurement()
    use = m["bf16_gflops"] > m["fp32_gflops"]
    return use, (f"BF16 = 'auto': {'bf16' if use else 'fp32'} on {m['cpu']} ({', '.join(m['flags']) or 'no AVX2'}; "
                 f"{m['threads']} threads): 1024^3 matmul {m['fp32_gflops']:.0f} GFLOP/s fp32, "
                 f"{m['bf16_gflops']:.0f} GFLOP/s bf16")
