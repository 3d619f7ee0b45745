"""Timing for the benchmarks: CUDA events on a GPU, perf_counter on the CPU."""

import time

import torch


def make_timer(device: str):
    """A function that runs ``fn()`` once and returns the seconds it took on ``device``."""
    if not device.startswith("cuda"):
        def run(fn):
            begin = time.perf_counter()
            fn()
            return time.perf_counter() - begin
        return run

    def run_cuda(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return run_cuda
