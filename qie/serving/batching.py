"""Several edits in one denoising batch: the transformer runs once per step (per CFG branch) for all.

Requests can share a batch when `batch_key` says so: same output size, steps, CFG setting,
condition token grids and engine options. Each request keeps its own prompt, images and seed;
prompts are padded to one length with a mask (as diffusers does for a list of prompts), so a
batch gives the same images as one edit at a time, within `qie.core.tolerances.TOLERANCES["batching"]`.

Example:
    >>> from qie import Editor
    >>> from qie.serving.batching import edit_batch
    >>> editor = Editor.load("tiny")                                    # doctest: +SKIP
    >>> results = edit_batch(editor, [request_a, request_b])            # doctest: +SKIP
    >>> [r.notes for r in results]                                      # doctest: +SKIP
    [('batch of 2',), ('batch of 2',)]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions
from PIL import Image

from qie.core import stages
from qie.core.request import EditRequest, EditResult
from qie.core.stages import VAE_IMAGE_SIZE, PromptEmbeds
from qie.errors import BusyError, InvalidRequestError, QieError
from qie.telemetry import StageTimer

log = logging.getLogger(__name__)


def condition_area(request: EditRequest) -> int:
    """The pixel area the request's input images are VAE-encoded at."""
    return request.width * request.height if request.condition_area == "output" else VAE_IMAGE_SIZE


def batch_key(request: EditRequest) -> Hashable:
    """What must match for two requests to share a denoising batch (cheap: no model work).

    Example:
        >>> from PIL import Image
        >>> a = EditRequest(images=[Image.new("RGB", (64, 48))], prompt="a", seed=1, max_side=128)
        >>> b = EditRequest(images=[Image.new("RGB", (64, 48))], prompt="b", seed=2, max_side=128)
        >>> batch_key(a) == batch_key(b)
        True
    """
    area = condition_area(request)
    grids = tuple(calculate_dimensions(area, img.width / img.height) for img in request.images)
    return (
        request.width,
        request.height,
        request.steps,
        request.true_cfg_scale if request.uses_cfg else None,
        grids,
        json.dumps(engine_options(request), sort_keys=True, default=str),
    )


# Request fields that `Editor.edit` applies and the batched loop does not (tiling, regions,
# speed options): a request that sets any of them away from its default is edited on its own.
SINGLE_ONLY_FIELDS = ("tile_size", "mask", "box", "mode", "attention_quant", "step_cache", "early_exit_threshold")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EditRequest) if f.name in SINGLE_ONLY_FIELDS}


def engine_options(request: EditRequest) -> dict:
    """The request's engine options and its `SINGLE_ONLY_FIELDS` set away from their defaults (empty: batchable)."""
    out = {name: getattr(request, name) for name, default in _DEFAULTS.items() if getattr(request, name) != default}
    out.update(request.options)
    return out


def _fast_editor(editor) -> bool:
    speed = getattr(editor, "speed", None)
    return getattr(speed, "default_mode", None) == "fast"  # fused Lightning LoRA: its own scheduler


def pad_prompts(prompts: Sequence[PromptEmbeds]) -> PromptEmbeds:
    """Stack prompt embeddings, zero-padded to the longest, with a mask (None when none is padded).

    The same padding and mask as diffusers' `_get_qwen_prompt_embeds` for a list of prompts.
    """
    rows = [p.embeds[0] for p in prompts]
    longest = max(r.shape[0] for r in rows)
    embeds = torch.stack([torch.cat([r, r.new_zeros(longest - r.shape[0], r.shape[1])]) for r in rows])
    mask = torch.stack(
        [
            torch.cat([torch.ones(r.shape[0], dtype=torch.long), torch.zeros(longest - r.shape[0], dtype=torch.long)])
            for r in rows
        ]
    ).to(embeds.device)
    return PromptEmbeds(embeds=embeds, mask=None if bool(mask.all()) else mask)


def edit_batch(editor: Any, requests: Sequence[EditRequest], *, timeout: float | None = None) -> list[EditResult]:
    """Run `requests` (all with the same `batch_key`) as one denoising batch on `editor`.

    Text and condition encoding and the VAE decode run per request; the denoising loop runs
    once for the whole batch. Each result's `notes` says the batch size; its `timings` are the
    batch's (shared by its images). Requests with engine `options` are refused: `Editor.edit`
    applies those.
    """
    if not requests:
        return []
    keys = {batch_key(r) for r in requests}
    if len(keys) > 1:
        raise InvalidRequestError(
            "requests", f"<{len(keys)} different shapes>", "batch only requests with the same batch_key()"
        )
    if any(engine_options(r) for r in requests) or _fast_editor(editor):
        raise InvalidRequestError(
            "options", "<per-request engine options>", "Editor.edit applies them: edit such requests one at a time"
        )
    if not editor.lock.acquire(timeout=-1 if timeout is None else timeout):
        raise BusyError(f"the editor stayed busy for {timeout:.0f}s; try again shortly")
    try:
        return _edit_batch_locked(editor, list(requests))
    finally:
        editor.pipe.maybe_free_model_hooks()
        editor.lock.release()


def _edit_batch_locked(editor: Any, requests: list[EditRequest]) -> list[EditResult]:
    pipe, device = editor.pipe, editor.pipe._execution_device
    first = requests[0]
    timer = StageTimer(device)
    with torch.inference_mode():
        encoded = [editor.encode(r, timer) for r in requests]
        prompt = pad_prompts([e[0] for e in encoded])
        negative = pad_prompts([e[1] for e in encoded]) if first.uses_cfg else None
        condition = stages.Condition(latents=torch.cat([e[2].latents for e in encoded]), shapes=encoded[0][2].shapes)
        dtype = prompt.embeds.dtype
        with timer("denoise"):
            noise = torch.cat(
                [
                    stages.prepare_noise(
                        pipe,
                        r.width,
                        r.height,
                        device=device,
                        dtype=dtype,
                        generator=torch.Generator("cpu").manual_seed(r.seed),
                    )
                    for r in requests
                ]
            )
            latents = stages.denoise(
                pipe,
                noise,
                condition,
                prompt,
                negative,
                steps=first.steps,
                true_cfg_scale=first.true_cfg_scale,
                width=first.width,
                height=first.height,
                predict=editor.predictor,
            )
        with timer("decode"):
            images = [stages.decode(pipe, latents[i : i + 1], first.width, first.height) for i in range(len(requests))]
    log.info("denoised a batch of %d (%dx%d, %d steps)", len(requests), first.width, first.height, first.steps)
    note = f"batch of {len(requests)}"
    return [
        EditResult(
            image=image.resize(r.input_size, Image.Resampling.LANCZOS) if r.resize_to_input else image,
            seed=r.seed,
            timings=dict(timer.timings),
            peak_vram_gib=timer.peak_vram_gib(),
            model=editor.model,
            revision=editor.revision,
            plan=editor.plan.name,
            steps_run=r.steps,
            notes=(note,),
        )
        for r, image in zip(requests, images, strict=True)
    ]


def group_by_key(requests: Sequence[EditRequest], max_batch: int) -> list[list[int]]:
    """Indices of `requests` grouped into batches of at most `max_batch` with equal `batch_key`, in order.

    Example:
        >>> group_by_key([], 2)
        []
    """
    groups: dict[Hashable, list[list[int]]] = {}
    for i, request in enumerate(requests):
        chunks = groups.setdefault(batch_key(request), [[]])
        if len(chunks[-1]) >= max_batch:
            chunks.append([])
        chunks[-1].append(i)
    return [chunk for chunks in groups.values() for chunk in chunks]


def run_grouped(editor: Any, requests: Sequence[EditRequest], max_batch: int) -> list[EditResult | QieError]:
    """Edit `requests` in batches of equal `batch_key` (at most `max_batch` each); results in request order.

    A request alone in its group, or one with per-request engine `options` (which only
    `Editor.edit` applies), runs through `editor.edit`. A request that fails comes back as its
    `QieError` instead of a result. When a batch fails (a bad request, or out of GPU memory),
    its requests are retried one at a time (WARNING logged), so one bad request fails alone and
    a batch too big for the GPU still completes.

    Example:
        >>> results = run_grouped(editor, [request_a, request_b, request_c], max_batch=2)  # doctest: +SKIP
    """
    out: list[EditResult | QieError | None] = [None] * len(requests)
    singles: list[int] = []
    for group in group_by_key(requests, max_batch):
        if len(group) == 1 or engine_options(requests[group[0]]) or _fast_editor(editor):
            singles += group
            continue
        try:
            for i, result in zip(group, edit_batch(editor, [requests[i] for i in group]), strict=True):
                out[i] = result
            continue
        except (QieError, torch.cuda.OutOfMemoryError) as exc:
            log.warning("a batch of %d failed (%s); running its requests one at a time", len(group), exc)
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
        singles += group
    for i in sorted(singles):
        try:
            out[i] = editor.edit(requests[i])
        except QieError as exc:
            out[i] = exc
    return out  # type: ignore[return-value]


def bench_batching(
    editor_or_pipe: Any,
    sizes: Sequence[tuple[int, int]] = ((1024, 1024),),
    batch_sizes: Sequence[int] = (1, 2, 4),
    *,
    steps: int = 4,
    true_cfg_scale: float = 4.0,
    repeats: int = 2,
) -> list[dict[str, Any]]:
    """Throughput (images/hour on this device) of `edit_batch` at each output size and batch size.

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
            edit_batch(editor, requests)  # warm-up (allocator, compile, kernels)
            best = float("inf")
            for _ in range(repeats):
                if editor.device.type == "cuda":
                    torch.cuda.synchronize(editor.device)
                start = time.perf_counter()
                edit_batch(editor, requests)
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
