"""`Editor`: one object that owns the pipeline, its memory plan and the lock around the GPU.

Example:
    >>> from qie import Editor, EditRequest
    >>> editor = Editor.load("tiny")                                    # doctest: +SKIP
    >>> result = editor.edit(EditRequest(images=["shoe.jpg"], prompt="white background"))  # doctest: +SKIP
    >>> result.image.save("out.png"); print(result.summary())           # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch
from PIL import Image

from . import stages
from .errors import BusyError
from .models import MODELS, REAL_MODEL_ID, check_hardware, load_pipeline, resolve_device, resolve_dtype
from .plans import Plan, choose_plan
from .request import EditRequest, EditResult
from .stages import VAE_IMAGE_SIZE
from .telemetry import StageTimer

log = logging.getLogger(__name__)

# Per-load switches for qie's deliberate differences from stock diffusers.
DEFAULT_FIXES = {"mm_token_type_ids": True}


class Editor:
    """Owns a loaded `QwenImageEditPlusPipeline`; `edit` runs one request at a time."""

    def __init__(
        self,
        pipe: Any,
        *,
        model: str,
        device: torch.device,
        dtype: torch.dtype,
        plan: Plan,
        revision: str | None = None,
        fixes: dict[str, bool] | None = None,
    ) -> None:
        self.pipe = pipe
        self.model = model
        self.device = device
        self.dtype = dtype
        self.plan = plan
        self.revision = revision
        self.fixes = {**DEFAULT_FIXES, **(fixes or {})}
        self.lock = threading.Lock()
        self.predictor: stages.Predictor | None = None  # set by qie.parallel for CFG-parallel runs
        pipe.set_progress_bar_config(disable=True)

    @classmethod
    def load(
        cls,
        model: str = REAL_MODEL_ID,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        revision: str | None = None,
        plan: str = "auto",
        vram_budget_gib: float | None = None,
        fixes: dict[str, bool] | None = None,
    ) -> Editor:
        """Load `model` ("tiny", a hub id or a local folder) and place it with a memory plan."""
        dev = resolve_device(device)
        if device is None:
            check_hardware(MODELS.get(model), dev)
        dt = resolve_dtype(dev, dtype)
        start = time.perf_counter()
        pipe = load_pipeline(model, device=dev, dtype=dt, revision=revision)
        chosen = choose_plan(pipe, dev, plan, vram_budget_gib)
        chosen.apply(pipe, dev)
        log.info("loaded %s on %s (%s, plan %s) in %.1fs", model, dev, dt, chosen.name, time.perf_counter() - start)
        return cls(pipe, model=model, device=dev, dtype=dt, plan=chosen, revision=revision, fixes=fixes)

    def edit(
        self,
        request: EditRequest,
        *,
        on_step: stages.StepCallback | None = None,
        cancel: threading.Event | None = None,
        timeout: float | None = None,
    ) -> EditResult:
        """Run one edit. Waits up to `timeout` seconds for the GPU (forever when None)."""
        if not self.lock.acquire(timeout=-1 if timeout is None else timeout):
            raise BusyError(f"the editor stayed busy for {timeout:.0f}s; try again shortly")
        try:
            return self._edit_locked(request, on_step=on_step, cancel=cancel)
        finally:
            self.pipe.maybe_free_model_hooks()
            self.lock.release()

    def _edit_locked(self, request: EditRequest, *, on_step, cancel) -> EditResult:
        pipe, device = self.pipe, self.pipe._execution_device
        timer = StageTimer(device)
        generator = torch.Generator("cpu").manual_seed(request.seed)  # same noise on every device
        with torch.inference_mode():
            prompt, negative, condition = self.encode(request, timer)
            dtype = prompt.embeds.dtype
            with timer("denoise"):
                noise = stages.prepare_noise(
                    pipe, request.width, request.height, device=device, dtype=dtype, generator=generator
                )
                latents = stages.denoise(
                    pipe,
                    noise,
                    condition,
                    prompt,
                    negative,
                    steps=request.steps,
                    true_cfg_scale=request.true_cfg_scale,
                    width=request.width,
                    height=request.height,
                    on_step=on_step,
                    cancel=cancel,
                    predict=self.predictor,
                )
            with timer("decode"):
                image = stages.decode(pipe, latents, request.width, request.height)
        if request.resize_to_input:
            image = image.resize(request.input_size, Image.Resampling.LANCZOS)
        return EditResult(
            image=image,
            seed=request.seed,
            timings=dict(timer.timings),
            peak_vram_gib=timer.peak_vram_gib(),
            model=self.model,
            revision=self.revision,
            plan=self.plan.name,
            steps_run=request.steps,
        )

    def encode(
        self, request: EditRequest, timer: StageTimer
    ) -> tuple[stages.PromptEmbeds, stages.PromptEmbeds | None, stages.Condition]:
        """Text-encode (prompt, negative) and VAE-encode one request; the caller holds the lock.

        Shared by `edit` and `qie.batching.edit_batch`.
        """
        pipe, device = self.pipe, self.pipe._execution_device
        with timer("text_encode"):
            small = stages.prompt_images(pipe, request.images)
            fix = self.fixes["mm_token_type_ids"]
            prompt = stages.encode_prompt(pipe, request.prompt, small, device=device, forward_mm_token_type_ids=fix)
            negative = None
            if request.uses_cfg:
                negative = stages.encode_prompt(
                    pipe, request.negative_prompt, small, device=device, forward_mm_token_type_ids=fix
                )
        with timer("condition_encode"):
            area = request.width * request.height if request.condition_area == "output" else VAE_IMAGE_SIZE
            condition = stages.encode_condition(
                pipe, request.images, device=device, dtype=prompt.embeds.dtype, area=area
            )
        return prompt, negative, condition

    def reference(self, request: EditRequest) -> Image.Image:
        """The stock diffusers call, unchanged, for the same request: the oracle for tests and benchmarks."""
        with self.lock:
            try:
                return self.pipe(
                    image=list(request.images),
                    prompt=request.prompt,
                    negative_prompt=request.negative_prompt,
                    true_cfg_scale=request.true_cfg_scale,
                    height=request.height,
                    width=request.width,
                    num_inference_steps=request.steps,
                    generator=torch.Generator("cpu").manual_seed(request.seed),
                ).images[0]
            finally:
                self.pipe.maybe_free_model_hooks()


_editor: Editor | None = None
_editor_lock = threading.Lock()


def get_editor(model: str | None = None, **load_kwargs: Any) -> Editor:
    """The process-wide `Editor`, loaded on first call (model from `model`, `$QIE_MODEL` or the real id)."""
    global _editor
    with _editor_lock:
        if _editor is None:
            import os

            _editor = Editor.load(model or os.environ.get("QIE_MODEL", REAL_MODEL_ID), **load_kwargs)
        return _editor


def set_editor(editor: Editor | None) -> None:
    """Replace (or with None, forget) the process-wide editor, e.g. in tests."""
    global _editor
    with _editor_lock:
        _editor = editor
