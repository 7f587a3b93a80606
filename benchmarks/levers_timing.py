"""Timing helpers of the lever A/B sections (`benchmarks.fast_levers`): CUDA-event and wall-clock medians,
kernel tables, relative error, an empty Inductor cache for a timed compile."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from benchmarks import profiling  # (importing it also tears CUPTI down after each profile)

IMAGE_TOKENS = 8192  # 1024² output + 1024² condition, 16 px per token
BLOCKS = 60


def cuda_ms(fn: Callable[[], Any], repeats: int = 10, warm: int = 3) -> float:
    """Median milliseconds of `fn()` by CUDA events, after `warm` calls."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fn: Callable[[], Any], calls: int = 20, replays: int = 7) -> float:
    """Median milliseconds per call of `fn()` replayed from a CUDA graph of `calls` calls: the GPU's time
    with no launch cost, as a captured forward runs it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return cuda_ms(graph.replay, repeats=replays, warm=2) / calls


def wall_ms(fn: Callable[[], Any], repeats: int = 20, warm: int = 3, until_done: bool = True) -> float:
    """Median milliseconds of `fn()` by the host clock, synchronized before and after (launch costs included).

    `until_done=False`: not synchronized after, so only the host's time in `fn()` from an idle GPU: the
    launch cost, which sets the pace wherever the GPU's share of a call is smaller.
    """
    for _ in range(warm):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if until_done:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def kernel_table(fn: Callable[[], Any], repeats: int = 5, top: int = 12) -> dict[str, float]:
    """Milliseconds per call of each GPU kernel `fn` launches (profiled over `repeats` calls), largest first."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    kernels = ((e.key, e.device_time_total / 1e3 / repeats) for e in prof.key_averages() if e.device_time_total > 0)
    rows = profiling.sum_by_prefix(kernels, chars=120)  # kernels whose names share their first 120 characters
    return dict(sorted(rows.items(), key=lambda r: -r[1])[:top])


def by_category(table: dict[str, float]) -> dict[str, float]:
    """A `kernel_table`'s milliseconds summed per kernel category (`profiling.classify`)."""
    categories: dict[str, float] = {}
    for kernel, ms in table.items():
        category = profiling.classify(kernel)
        categories[category] = categories.get(category, 0.0) + ms
    return categories


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


@contextlib.contextmanager
def empty_inductor_cache() -> Iterator[str]:
    """Inductor's cache in a fresh, empty folder (`TORCHINDUCTOR_CACHE_DIR`, read at each compile) for
    the block, so a compile inside it is timed, not read back; the previous setting back after."""
    import tempfile

    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            yield cache
        finally:
            if before is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
