"""Timing for the benchmarks: CUDA events on a GPU, perf_counter on the CPU; and the environment each
result is printed and saved with."""

import platform
import time
from datetime import datetime, timezone

import torch


def environment(device: str) -> dict:
    """Where and when a benchmark runs: device, device_name (the GPU, or the CPU and its threads), torch, date."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    return {"device": device, "device_name": name, "torch": torch.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def describe(env: dict) -> str:
    """``environment``'s fields for a table's heading."""
    return f"{env['device']} ({env['device_name']}), torch {env['torch']}, {env['date']}"


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
