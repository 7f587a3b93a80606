"""Throughput of batched edits (`Editor.edit_batch`) at each output size and batch size: the bench's
`batching` section and `benchmarks/capacity.py` read these rows."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from qie.core.request import EditRequest

log = logging.getLogger(__name__)


def bench_batching(
    editor_or_pipe: Any,
    sizes: Sequence[tuple[int, int]] = ((1024, 1024),),
    batch_sizes: Sequence[int] = (1, 2, 4),
    *,
    steps: int = 4,
    true_cfg_scale: float = 4.0,
    repeats: int = 2,
) -> list[dict[str, Any]]:
    """Throughput (images/hour on this device) of `Editor.edit_batch` at each output size and batch size.

    Each row has the size, batch size, seconds per batch (best of `repeats`, after a warm-up
    batch), images/hour and the speed-up over batch 1 at the same size. Meant for a GPU with
    the full-size model (random weights are fine: the cost does not depend on the values).

    Example:
        >>> rows = bench_batching(Editor.load(), sizes=[(1024, 1024)], batch_sizes=[1, 2])  # doctest: +SKIP
        >>> rows[1]["speedup_vs_batch1"]                                                    # doctest: +SKIP

    A bare `QwenImageEditPlusPipeline` (e.g. full-size random weights already on the GPU) is
    wrapped in an `Editor` with the "resident" plan.
    """
    editor = editor_or_pipe if hasattr(editor_or_pipe, "encode") else _wrap_pipe(editor_or_pipe)
    rows = []
    for width, height in sizes:
        base = None
        for batch in batch_sizes:
            requests = [
                EditRequest(
                    images=[Image.new("RGB", (width, height), (40 * i % 255, 90, 160))],
                    prompt=f"make the background white, variant {i}",
                    steps=steps,
                    true_cfg_scale=true_cfg_scale,
                    seed=i,
                    width=width,
                    height=height,
                )
                for i in range(batch)
            ]
            editor.edit_batch(requests)  # warm-up (allocator, compile, kernels)
            best = float("inf")
            for _ in range(repeats):
                if editor.device.type == "cuda":
                    torch.cuda.synchronize(editor.device)
                start = time.perf_counter()
                editor.edit_batch(requests)
                if editor.device.type == "cuda":
                    torch.cuda.synchronize(editor.device)
                best = min(best, time.perf_counter() - start)
            per_hour = batch * 3600 / best
            if batch == 1:
                base = per_hour
            rows.append(
                {
                    "width": width,
                    "height": height,
                    "batch": batch,
                    "steps": steps,
                    "true_cfg_scale": true_cfg_scale,
                    "seconds_per_batch": best,
                    "images_per_hour": per_hour,
                    "speedup_vs_batch1": per_hour / base if base else None,
                }
            )
            log.info("batch %d at %dx%d: %.2fs, %.0f images/hour", batch, width, height, best, per_hour)
    return rows


def _wrap_pipe(pipe: Any) -> Any:
    from qie.core.editor import Editor
    from qie.memory.plans import PLANS

    device = pipe._execution_device
    return Editor(pipe, model="pipeline", device=device, dtype=pipe.transformer.dtype, plan=PLANS["resident"])
