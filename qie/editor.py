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

from . import cache, masking, stages
from .errors import BusyError
from .models import MODELS, REAL_MODEL_ID, check_hardware, load_pipeline, resolve_device, resolve_dtype
from .plans import Plan, choose_plan
from .request import EditRequest, EditResult
from .speed_options import SpeedSetup, request_speed, setup_speed
from .stages import VAE_IMAGE_SIZE
from .telemetry import StageTimer
from .versions import warn_known_problems

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
        self.compiled = False
        self.cache = cache.EditCache()  # prompt embeddings and condition latents (qie/cache.py)
        self.speed = SpeedSetup()  # attention backend and fast mode; set by `load`
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
        compile: bool = False,
        attention: str | None = "auto",
        fast_lora: str | None = None,
        fast_steps: int = 8,
        fast_fuse: bool = True,
    ) -> Editor:
        """Load `model` ("tiny", a hub id or a local folder) and place it with a memory plan.

        `attention` names a diffusers attention backend ("auto": the fastest available);
        `fast_lora` (a file, folder or hub id of the Lightning LoRA) enables fast mode with
        `fast_steps` steps, fused into the weights unless `fast_fuse` is False (see README).
        With `compile=True` (CUDA only) the transformer block is compiled and warmed up once at
        1024²; if compiling fails, the editor logs a warning and runs eager.
        """
        dev = resolve_device(device)
        if device is None:
            check_hardware(MODELS.get(model), dev)
        dt = resolve_dtype(dev, dtype)
        warn_known_problems()
        start = time.perf_counter()
        pipe = load_pipeline(model, device=dev, dtype=dt, revision=revision)
        chosen = choose_plan(pipe, dev, plan, vram_budget_gib)
        chosen.apply(pipe, dev, vram_budget_gib)
        speed = setup_speed(
            pipe, dev, dt, attention_backend=attention, fast_lora=fast_lora, fast_steps=fast_steps, fast_fuse=fast_fuse
        )
        log.info("loaded %s on %s (%s, plan %s) in %.1fs", model, dev, dt, chosen.name, time.perf_counter() - start)
        editor = cls(pipe, model=model, device=dev, dtype=dt, plan=chosen, revision=revision, fixes=fixes)
        editor.speed = speed  # before compile: LoRA fusing and the attention backend change the graph
        if compile:
            editor.enable_compile()
        return editor

    def enable_compile(self, warm_up_size: int = 1024) -> bool:
        """Compile the transformer block (regional) and warm it up; False and eager on failure."""
        from .compile import compile_blocks, uncompile_blocks

        if self.device.type != "cuda" or self.plan.name in ("stream", "model-offload"):
            log.warning("compile skipped: it needs CUDA and a plan with resident weights (plan %s)", self.plan.name)
            return False
        if not compile_blocks(self.pipe.transformer):
            return False
        start = time.perf_counter()
        try:
            self.edit(warm_up_request(warm_up_size))
        except Exception as exc:  # an unsupported op shows up only when the graph is traced
            log.warning("compiled warm-up failed (%s: %s); running eager", type(exc).__name__, exc)
            uncompile_blocks(self.pipe.transformer)
            return False
        self.compiled = True
        log.info("compiled and warmed up in %.0fs", time.perf_counter() - start)
        return True

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
        pipe, device = self.pipe, self.device
        timer = StageTimer(device)
        generator = torch.Generator("cpu").manual_seed(request.seed)  # same noise on every device
        with torch.inference_mode(), request_speed(pipe, self.speed, request) as run:
            prompt, negative, condition, notes = self.encode(request, timer, uses_cfg=run.uses_cfg)
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
                    steps=run.steps,
                    true_cfg_scale=run.true_cfg_scale,
                    width=request.width,
                    height=request.height,
                    on_step=on_step,
                    cancel=cancel,
                    observer=run.observer,
                    predict=self.predictor,
                )
            with timer("decode"):
                image = stages.decode(pipe, latents, request.width, request.height, tile=request.tiling)
        if request.resize_to_input:
            image = image.resize(request.input_size, Image.Resampling.LANCZOS)
        # --- masked edit: the original's pixels outside the region (qie/masking.py) ---
        if request.has_region:
            image = masking.keep_outside_region(request, image)
            notes.append(f"kept the original outside the {'mask' if request.mask is not None else 'box'}")
        if request.tiling is not None:
            notes.append(f"VAE tiled ({request.tile_size} px tiles, {request.tile_overlap} px overlap)")
        return EditResult(
            image=image,
            seed=request.seed,
            timings=dict(timer.timings),
            peak_vram_gib=timer.peak_vram_gib(),
            stage_peaks_gib=dict(timer.peaks_gib),
            model=self.model,
            revision=self.revision,
            plan=self.plan.name,
            steps_run=run.steps_run,
            steps_skipped=run.steps - run.steps_run,
            notes=(*run.finish_notes(), *notes),
            cached_calls=run.cache.cached if run.cache is not None else 0,
        )

    def encode(
        self, request: EditRequest, timer: StageTimer, uses_cfg: bool | None = None
    ) -> tuple[stages.PromptEmbeds, stages.PromptEmbeds | None, stages.Condition, list[str]]:
        """Text-encode (prompt, negative) and VAE-encode one request, through the prompt/condition
        cache; the caller holds the lock. Returns the encodings and notes on cache hits.

        `uses_cfg` overrides the request's CFG setting (fast mode runs without CFG). Shared by
        `edit` and `qie.batching.edit_batch`.
        """
        pipe, device = self.pipe, self.device
        self.cache.bind(pipe)
        notes: list[str] = []
        ids = {"model": self.model, "revision": self.revision}
        with timer("text_encode"):
            prompt, negative, hit = cache.encode_prompts(
                self.cache, pipe, request, **ids, fixes=self.fixes, device=device, uses_cfg=uses_cfg
            )
            notes += ["prompt cache hit"] if hit else []
        with timer("condition_encode"):
            area = request.width * request.height if request.condition_area == "output" else VAE_IMAGE_SIZE
            condition, hit = cache.encode_condition(
                self.cache, pipe, request, **ids, area=area, device=device, dtype=prompt.embeds.dtype
            )
            notes += ["condition cache hit"] if hit else []
        return prompt, negative, condition, notes

    def reference(self, request: EditRequest) -> Image.Image:
        """The stock diffusers call, unchanged, for the same request: the oracle for tests and benchmarks."""
        with self.lock:
            try:
                return run_stock(self.pipe, request)
            finally:
                self.pipe.maybe_free_model_hooks()


def run_stock(pipe: Any, request: EditRequest, **extra: Any) -> Image.Image:
    """`pipe(...)` exactly as a stock diffusers user calls it for `request` (`extra`: more call arguments)."""
    kwargs = {
        "image": list(request.images),
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "true_cfg_scale": request.true_cfg_scale,
        "height": request.height,
        "width": request.width,
        "num_inference_steps": request.steps,
        "generator": torch.Generator("cpu").manual_seed(request.seed),
    }
    return pipe(**{**kwargs, **extra}).images[0]


def warm_up_request(size: int) -> EditRequest:
    """A 2-step CFG edit of a plain image at `size`²: traces both prompt lengths once."""
    return EditRequest(
        images=[Image.new("RGB", (size, size), (128, 128, 128))],
        prompt="warm up",
        steps=2,
        seed=0,
        width=size,
        height=size,
    )


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
