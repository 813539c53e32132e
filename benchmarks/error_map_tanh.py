"""Cost of EKDAA's tanh error map on one conv1-sized tensor (paper CNN, batch 50), against
backprop's tanh backward: the fused pass as the library runs it (tanh written with exp), the
same pass with torch.tanh, and the eager function. One thread, timed in its CPU time, so that
other processes on a busy machine count for little; run from the repository root:

    python benchmarks/error_map_tanh.py [--shape 50,64,32,32]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import nn

from ekdaa.fused import Fused
from ekdaa.rules.ekdaa import error_map_kernel


def cpu_ms(fn: Callable[[], object], calls: int = 30, repeats: int = 7) -> float:
    """Median over ``repeats`` of the thread CPU milliseconds per call."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        times.append((time.thread_time() - start) / calls * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="50,64,32,32")
    args = parser.parse_args()
    torch.set_num_threads(1)  # thread_time counts this thread only
    torch.manual_seed(0)
    shape = [int(n) for n in args.shape.split(",")]
    h = (torch.randn(shape) * 3).to(memory_format=torch.channels_last)
    z, d = torch.tanh(h), torch.randn_like(h) * 0.05
    step, scale = 0.9 * shape[0], 1.0 / shape[0]
    library = error_map_kernel(nn.Tanh(), None, False)
    with_tanh = Fused(library.fn, "error map with torch.tanh")  # the eager function, compiled as it is
    scratch = h.clone()  # the fused passes write over their first argument: the cost is the same
    rows = {"fused, tanh as 1 - 2/(1 + exp(2u)) (the library's)": lambda: library(scratch, d, step, scale),
            "fused, torch.tanh": lambda: with_tanh(scratch, d, step, scale),
            "eager (small tensors, no compiler)": lambda: library.fn(h, d, step, scale),
            "backprop's tanh backward": lambda: torch.ops.aten.tanh_backward(d, z)}
    print(f"shape {shape}, 1 thread, torch {torch.__version__}: thread CPU ms per call")
    for name, fn in rows.items():
        print(f"  {name:52s} {cpu_ms(fn):8.3f}")
    for kernel in (library, with_tanh):  # else the "fused" rows timed the eager fallback
        if kernel._compiled is None or kernel._broken:
            raise SystemExit(f"{kernel.name} ran eagerly (no compiler, or a tensor under ekdaa.fused.MIN_NUMEL['cpu'])")


if __name__ == "__main__":
    main()
