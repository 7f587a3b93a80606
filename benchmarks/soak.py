"""Soak: many small edits in a row, watching host RSS (and GPU memory) for growth.

`python -m qie soak --model tiny --edits 200` runs it and prints a JSON report. RSS is read after
a few warm-up edits (allocators and caches settle first) and after every edit; `rss_growth_mib` is
the last reading minus the first, `rss_slope_kib_per_edit` a least-squares slope over all of them.

Example:
    >>> report = soak(Editor.load("tiny"), edits=30)       # doctest: +SKIP
    >>> report.rss_growth_mib < 50                          # doctest: +SKIP
    True
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from qie.core.request import EditRequest

MIB = 2**20


@dataclass(frozen=True)
class SoakReport:
    """What a soak measured (memory in MiB)."""

    edits: int
    seconds: float
    rss_start_mib: float
    rss_end_mib: float
    rss_max_mib: float
    rss_growth_mib: float
    rss_slope_kib_per_edit: float
    vram_start_mib: float | None
    vram_end_mib: float | None
    failures: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def soak(
    editor: Any,
    edits: int = 200,
    *,
    warmup: int = 3,
    size: int = 64,
    steps: int = 2,
    on_edit: Callable[[int, float], None] | None = None,
) -> SoakReport:
    """Run `warmup` + `edits` edits of a `size`² image with `steps` steps; report memory growth.

    Seeds vary per edit (as real traffic does); a failed edit is counted, not raised.
    """
    import psutil
    import torch

    process = psutil.Process()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    cuda = editor.device.type == "cuda"

    def request(i: int) -> EditRequest:
        return EditRequest(
            images=[image], prompt=f"edit number {i}", steps=steps, seed=i, max_side=size, condition_area="output"
        )

    for i in range(warmup):
        editor.edit(request(i))
    gc.collect()
    vram_start = torch.cuda.memory_allocated(editor.device) / MIB if cuda else None
    readings = [process.memory_info().rss / MIB]
    failures = 0
    start = time.perf_counter()
    for i in range(edits):
        try:
            editor.edit(request(warmup + i))
        except Exception:  # counted and reported: a soak must run to its end
            failures += 1
        readings.append(process.memory_info().rss / MIB)
        if on_edit is not None:
            on_edit(i + 1, readings[-1])
    gc.collect()
    readings.append(process.memory_info().rss / MIB)
    slope = float(np.polyfit(np.arange(len(readings)), readings, 1)[0]) if len(readings) > 2 else 0.0
    return SoakReport(
        edits=edits,
        seconds=round(time.perf_counter() - start, 2),
        rss_start_mib=round(readings[0], 1),
        rss_end_mib=round(readings[-1], 1),
        rss_max_mib=round(max(readings), 1),
        rss_growth_mib=round(readings[-1] - readings[0], 2),
        rss_slope_kib_per_edit=round(slope * 1024, 2),
        vram_start_mib=None if vram_start is None else round(vram_start, 1),
        vram_end_mib=round(torch.cuda.memory_allocated(editor.device) / MIB, 1) if cuda else None,
        failures=failures,
    )
