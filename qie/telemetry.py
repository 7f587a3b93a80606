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
        self.peaks_gib: dict[str, float] = {}  # per-stage peak allocated GPU memory (CUDA only)
        self._overall = 0.0
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
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device) / 2**30
                self.peaks_gib[stage] = max(peak, self.peaks_gib.get(stage, 0.0))
                self._overall = max(self._overall, peak)
                torch.cuda.reset_peak_memory_stats(self.device)

    def peak_vram_gib(self) -> float | None:
        """Peak memory allocated by torch on the GPU since the timer started (None on CPU)."""
        if self.device.type != "cuda":
            return None
        return max(self._overall, torch.cuda.max_memory_allocated(self.device) / 2**30)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
