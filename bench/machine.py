"""What the bench ran on: CPU model, cores, its bf16 support, torch version and threads, and the measured matmul peak.

The same bench gives very different ratios on different CPUs (bf16 is native with AMX or AVX512-BF16 and emulated,
slower than fp32, without), so every ``make bench`` records the machine beside its results (``machine`` in
``bench-results.json``) and prints it above the table.

The peak is what this CPU's bf16 matmul actually sustains: ``torch.matmul`` of square bf16 matrices (2048 and 4096)
on all of torch's threads, best of several timed calls, in TFLOP/s (2 n^3 FLOPs per call). The fp32 peak is measured
the same way (2048 only). ``embed`` reports its throughput as a share of the peak of the dtype it runs in.

Measured once per ``bench.run`` invocation: the parent stores the report in ``BENCH_MACHINE`` and the sections (each
in its own process) read it from there, so every section of one run refers to the same figures.

    python -m bench.machine        # the report alone, as JSON
"""

from __future__ import annotations

import functools
import json
import os
import time

ENV = "BENCH_MACHINE"


def cpuinfo() -> dict:
    """``model name`` and ``flags`` of the first processor, and physical cores (distinct physical/core id pairs)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return {"model": "unknown", "flags": set(), "cores": os.cpu_count() or 0}
    model, flags, cores, physical = "unknown", set(), set(), "0"
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and model == "unknown":
            model = value
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif key == "physical id":
            physical = value
        elif key == "core id":
            cores.add((physical, value))
    return {"model": model, "flags": flags, "cores": len(cores) or os.cpu_count() or 0}


def bf16_kind(flags: set[str]) -> str:
    """How this CPU runs bf16 matmuls: "AMX" (tile units), "AVX512-BF16" (dot-product instructions) or "none"
    (emulated through fp32, slower than plain fp32)."""
    if {"amx_bf16", "amx_tile"} & flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return "none"


def matmul_tflops(dtype: str, sizes: tuple[int, ...], calls: int = 5, device: str = "cpu") -> tuple[float, int]:
    """Best TFLOP/s of ``calls`` timed ``torch.matmul`` of two n x n matrices per size (after one untimed call) on
    ``device``; returns (TFLOP/s, the size that gave it). On CUDA each call is timed between synchronisations, as
    kernels launch asynchronously."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best, best_n = 0.0, 0
    with torch.inference_mode():
        for n in sizes:
            gen = torch.Generator().manual_seed(0)
            a = torch.randn(n, n, generator=gen).to(device=device, dtype=getattr(torch, dtype))
            b = torch.randn(n, n, generator=gen).to(device=device, dtype=getattr(torch, dtype))
            torch.matmul(a, b)
            for _ in range(calls):
                sync()
                t = time.perf_counter()
                torch.matmul(a, b)
                sync()
                rate = 2 * n**3 / (time.perf_counter() - t) / 1e12
                if rate > best:
                    best, best_n = rate, n
    return best, best_n


def measure() -> dict:
    import torch

    info = cpuinfo()
    bf16, bf16_n = matmul_tflops("bfloat16", (2048, 4096))
    fp32, _ = matmul_tflops("float32", (2048,))
    return {
        "cpu": info["model"],
        "cores": info["cores"],
        "logical_cpus": os.cpu_count() or 0,
        "bf16": bf16_kind(info["flags"]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "bf16_matmul_tflops": round(bf16, 4),
        "bf16_matmul_size": bf16_n,
        "fp32_matmul_tflops": round(fp32, 4),
    }


@functools.cache
def report() -> dict:
    """This run's machine report: from ``BENCH_MACHINE`` when the parent measured it, else measured now (and
    exported, so processes started from here reuse it)."""
    if os.environ.get(ENV):
        return json.loads(os.environ[ENV])
    result = measure()
    os.environ[ENV] = json.dumps(result)
    return result


def peak_tflops(dtype: str) -> float:
    """The measured matmul peak for ``dtype`` ("bfloat16" or "float32")."""
    return report()["bf16_matmul_tflops" if dtype == "bfloat16" else "fp32_matmul_tflops"]


def line(m: dict) -> str:
    return (
        f"machine: {m['cpu']}, {m['cores']} cores ({m['logical_cpus']} logical), bf16: {m['bf16']}, "
        f"torch {m['torch']} on {m['threads']} threads; matmul peak bf16 {m['bf16_matmul_tflops']:.3f} TFLOP/s "
        f"({m['bf16_matmul_size']}^2), fp32 {m['fp32_matmul_tflops']:.3f} TFLOP/s"
    )


if __name__ == "__main__":
    print(json.dumps(report(), indent=1))
