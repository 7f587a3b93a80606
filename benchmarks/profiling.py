"""Where a transformer forward's time goes on the GPU: matrix work, host-to-device copies, or neither.

`profile_forward` replays one captured transformer call and splits its time three ways: the wall
time of one forward, the summed duration of its GPU kernels, and the summed duration of its
host-to-device copies. Compared, they name the bound: wall ≈ kernels means compute-bound;
wall ≈ kernels + copies means the copies do not overlap with the compute; wall ≈ copies means
PCIe-bound; wall well above both means the host (Python, launches, synchronization) is the limit.

Example:
    >>> summary = profile_forward(pipe.transformer, lambda: editor.edit(request))  # doctest: +SKIP
    >>> summary["forward_s"], summary["kernel_s"], summary["h2d_s"]  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def cuda_sync() -> None:
    """Wait for the GPU's queued work, when there is a GPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def capture_call(module: torch.nn.Module, trigger: Callable[[], Any]) -> tuple[tuple, dict]:
    """The positional and keyword arguments of `module`'s first call while `trigger()` runs."""
    calls: list[tuple[tuple, dict]] = []

    def grab(mod, args, kwargs):
        if not calls:
            calls.append((args, dict(kwargs)))

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        trigger()
    finally:
        handle.remove()
    if not calls:
        raise RuntimeError(f"{type(module).__name__} was not called by the trigger")
    return calls[0]


def split_device_time(events: Any) -> dict[str, Any]:
    """Sum a profiler's `key_averages()` into kernel and host-to-device copy time (seconds), and the top kernels."""
    kernels: dict[str, float] = {}
    h2d = other_copies = 0.0
    for e in events:
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        key = e.key.lower()
        if "memcpy htod" in key:
            h2d += us
        elif "memcpy" in key or "memset" in key:
            other_copies += us
        else:
            kernels[e.key] = kernels.get(e.key, 0.0) + us
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:8]
    return {
        "kernel_s": sum(kernels.values()) / 1e6,
        "h2d_s": h2d / 1e6,
        "other_copies_s": other_copies / 1e6,
        "top_kernels_s": {k[:80]: round(v / 1e6, 4) for k, v in top},
    }


def profile_forward(module: torch.nn.Module, trigger: Callable[[], Any], repeats: int = 3) -> dict[str, Any]:
    """Per forward of `module` (replaying its first call under `trigger`): wall, kernel and copy seconds."""
    from torch.profiler import ProfilerActivity, profile

    args, kwargs = capture_call(module, trigger)
    with torch.no_grad():
        module(*args, **kwargs)  # warm
        cuda_sync()
        start = time.perf_counter()
        for _ in range(repeats):
            module(*args, **kwargs)
        cuda_sync()
        wall = (time.perf_counter() - start) / repeats
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            for _ in range(repeats):
                module(*args, **kwargs)
            cuda_sync()
    split = split_device_time(prof.key_averages())
    per = {k: (v / repeats if isinstance(v, float) else v) for k, v in split.items()}
    per["top_kernels_s"] = {k: round(v / repeats, 4) for k, v in split["top_kernels_s"].items()}
    return {"forward_s": wall, **per}
