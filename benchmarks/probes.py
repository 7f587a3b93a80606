"""One timed edit and the rows the benchmark writes: the pieces every bench section shares.

`probe_qie` times an edit through `Editor.edit`, `probe_stock` the stock diffusers call on the same
request (`make_request`), `time_e2e` the median of unsynchronized edits after a warm-up.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image, ImageDraw

from benchmarks.profiling import GcPauses, cuda_sync
from qie.core.editor import run_stock

PROMPT = "Replace the background with pure white and add a red price tag that says 'Sale $19.9' bottom right"


@dataclass
class Row:
    """One measured configuration."""

    name: str
    size: int
    plan: str
    step_s_nocfg: float | None = None
    step_s_cfg: float | None = None
    e2e_8_nocfg_s: float | None = None
    e2e_40_cfg_s: float | None = None
    e2e_40_cfg_measured: bool = False
    text_encode_s: float | None = None
    condition_encode_s: float | None = None
    decode_s: float | None = None
    resident_gib: float | None = None
    peak_gib: float | None = None
    stage_peaks_gib: dict[str, float] = field(default_factory=dict)
    psnr_vs_ref: float | None = None
    max_abs_vs_ref: int | None = None
    ratio_step_cfg: float | None = None
    ratio_step_nocfg: float | None = None
    e2e_s: dict[str, float] = field(default_factory=dict)  # other end-to-end timings, by label
    profile: dict[str, Any] = field(default_factory=dict)  # `benchmarks.profiling.profile_forward` at this size
    clocks: dict[str, Any] | None = None  # `benchmarks.clocks.summarize` of the row's window (CUDA with nvidia-smi)
    notes: list[str] = field(default_factory=list)


@dataclass
class Probe:
    step_s: float
    e2e_s: float
    image: Image.Image
    timings: dict[str, float]
    peak_gib: float | None
    stage_peaks_gib: dict[str, float]
    steps_run: int | None = None
    notes: tuple[str, ...] = ()
    first_e2e_s: float | None = None  # `bench_fast.time_e2e`: the warm-up edit (compiles what is compiled)
    first_timings: dict[str, float] = field(default_factory=dict)  # that edit's stage seconds
    gc_s: float = 0.0  # Python's garbage-collector pauses during the edit (`GcPauses`)
    gc_collections: dict[int, int] = field(default_factory=dict)  # their count per generation


def test_image(size: int) -> Image.Image:
    """A deterministic product-photo-like input: a bottle on a gradient, with a logo."""
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    for y in range(0, size, 4):
        shade = 90 + int(120 * y / size)
        draw.rectangle([0, y, size, y + 4], fill=(shade, shade - 30, 200 - shade // 2))
    draw.rounded_rectangle([size * 0.35, size * 0.2, size * 0.65, size * 0.9], radius=size // 20, fill=(20, 120, 60))
    draw.ellipse([size * 0.42, size * 0.4, size * 0.58, size * 0.56], fill=(240, 220, 40))
    draw.text((size * 0.05, size * 0.05), "LOGO", fill=(255, 255, 255))
    return img


def _median_step(stamps: list[float]) -> float:
    diffs = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return statistics.median(diffs) if diffs else math.nan


def make_request(size: int, steps: int, cfg: bool, seed: int = 0, **options: Any):
    """The bench's edit at `size`²; the condition is encoded at ~1024² as stock does, unless `options` say."""
    from qie.core.request import EditRequest

    options.setdefault("condition_area", "model")
    return EditRequest(
        images=[test_image(size)],
        prompt=PROMPT,
        steps=steps,
        true_cfg_scale=4.0 if cfg else 1.0,
        negative_prompt=" " if cfg else None,
        seed=seed,
        width=size,
        height=size,
        **options,
    )


def probe_qie(editor, size: int, steps: int, cfg: bool, *, stamp_steps: bool = True, **options: Any) -> Probe:
    """One edit through `Editor.edit` (with request `options`), timing each denoising step.

    The step stamps synchronize with the GPU after every step; `stamp_steps=False` leaves the loop
    unsynchronized (step_s is then NaN) for end-to-end times as a service sees them.
    """
    stamps: list[float] = []

    def on_step(i: int, n: int) -> None:
        cuda_sync()
        stamps.append(time.perf_counter())

    request = make_request(size, steps, cfg, **options)
    cuda_sync()
    start = time.perf_counter()
    with GcPauses() as pauses:
        result = editor.edit(request, on_step=on_step if stamp_steps else None)
        cuda_sync()
    return Probe(
        step_s=_median_step(stamps),
        e2e_s=time.perf_counter() - start,
        image=result.image,
        timings=dict(result.timings),
        peak_gib=result.peak_vram_gib,
        stage_peaks_gib=dict(result.stage_peaks_gib),
        steps_run=result.steps_run,
        notes=tuple(result.notes),
        gc_s=pauses.seconds,
        gc_collections=dict(pauses.collections),
    )


def probe_stock(pipe, size: int, steps: int, cfg: bool) -> Probe:
    """The stock diffusers call, unchanged, timing each step with its callback."""
    stamps: list[float] = []
    request = make_request(size, steps, cfg)

    def callback(p, i, t, kwargs):
        cuda_sync()
        stamps.append(time.perf_counter())
        return {}

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cuda_sync()
    start = time.perf_counter()
    image = run_stock(pipe, request, callback_on_step_end=callback)
    cuda_sync()
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return Probe(_median_step(stamps), time.perf_counter() - start, image, {}, peak, {})


def time_e2e(editor, size: int, steps: int, cfg: bool, repeats: int = 3, **options: Any) -> Probe:
    """Warm up once; the median end-to-end seconds of `repeats` unsynchronized edits, and the step
    seconds of one more with a synchronized stamp per step."""
    first = probe_qie(editor, size, steps, cfg, stamp_steps=False, **options)
    runs = [probe_qie(editor, size, steps, cfg, stamp_steps=False, **options) for _ in range(repeats)]
    stamped = probe_qie(editor, size, steps, cfg, **options)
    median = sorted(runs, key=lambda p: p.e2e_s)[len(runs) // 2]
    return dataclasses.replace(
        median, step_s=stamped.step_s, first_e2e_s=first.e2e_s, first_timings=dict(first.timings)
    )
