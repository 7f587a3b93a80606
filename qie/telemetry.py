"""Stage timings and peak GPU memory for one edit."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StageTimer:
    """Times named stages; on CUDA it synchronizes so each time is the stage's own.

    Example:
        >>> timer = StageTimer(torch.device("cpu"))
        >>> with timer("decode"):
        ...     pass
        >>> list(timer.timings)
        ['decode']
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.timings: dict[str, float] = {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def peak_vram_gib(self) -> float | None:
        """Peak memory allocated by torch on the GPU since the timer started (None on CPU)."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**30

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
