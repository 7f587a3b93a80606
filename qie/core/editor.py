"""`Editor`: one object that owns the pipeline, its memory plan and the lock around the GPU.

Example:
    >>> from qie import Editor, EditRequest
    >>> editor = Editor.load("tiny")                                    # doctest: +SKIP
    >>> result = editor.edit(EditRequest(images=["shoe.jpg"], prompt="white background"))  # doctest: +SKIP
    >>> result.image.save("out.png"); print(result.summary())           # doctest: +SKIP
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from PIL import Image

from qie import telemetry
from qie.core import encode_cache as cache
from qie.core import masking, stages
from qie.core.faults import Fault, arm_spec
from qie.core.load_options import LoadOptions
from qie.core.models import MODELS, REAL_MODEL_ID, check_hardware, load_pipeline, resolve_device, resolve_dtype
from qie.core.request import EditRequest, EditResult
from qie.core.safety import SafetyFilter, load_filter
from qie.core.speed_setup import SpeedSetup, request_speed, setup_speed
from qie.core.stages import VAE_IMAGE_SIZE
from qie.errors import (
    BusyError,
    CancelledError,
    EditTimeoutError,
    InvalidRequestError,
    QieError,
    ResourceError,
    SafetyError,
)
from qie.memory.plans import PLANS, Plan, choose_plan, next_plan
from qie.telemetry import StageTimer
from qie.versions import warn_known_problems

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
        fixes: Mapping[str, bool] | None = None,
        safety: SafetyFilter | None = None,
        fault: Fault | None = None,
    ) -> None:
        """Wrap a placed pipeline. `safety` (a loaded filter) and `fault` (an armed fault drill) come
        from the caller: `load` builds them from its `LoadOptions`; the editor reads no environment."""
        self.pipe = pipe
        self.model = model
        self.device = device
        self.dtype = dtype
        self.plan = plan
        self.revision = revision
        self.fixes = {**DEFAULT_FIXES, **(fixes or {})}
        self.lock = threading.Lock()
        self.compiled = False
        self.cache = cache.EditCache()  # prompt embeddings and condition latents (qie/core/encode_cache.py)
        self.speed = SpeedSetup()  # attention backend and fast mode; set by `load`
        self.predictor: stages.Predictor | None = None  # set by qie.serving.parallel for CFG-parallel runs
        pipe.set_progress_bar_config(disable=True)
        self.safety = safety
        self.fault = fault

    @classmethod
    def load(
        cls,
        options: LoadOptions | str = REAL_MODEL_ID,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        **overrides: Any,
    ) -> Editor:
        """Load a model and place it with a memory plan, as `options` say (see `LoadOptions`).

        `options` is a `LoadOptions` or a model ("tiny", a hub id or a local folder); `device`,
        `dtype` and keyword `overrides` (any `LoadOptions` field) replace its values. With
        `compile=True` (CUDA only) the transformer block is compiled and warmed up once at 1024²;
        if compiling fails, the editor logs a warning and runs eager.

        Example:
            >>> Editor.load("tiny", plan="resident")                                  # doctest: +SKIP
            >>> Editor.load(LoadOptions(model="tiny", fast_lora="lightning.safetensors"))  # doctest: +SKIP
        """
        opts = _load_options(options, device=device, dtype=dtype, **overrides)
        dev = resolve_device(opts.device)
        if opts.device is None:
            check_hardware(MODELS.get(opts.model), dev)
        dt = resolve_dtype(dev, opts.dtype)
        warn_known_problems()
        start = time.perf_counter()
        pipe = load_pipeline(opts.model, device=dev, dtype=dt, revision=opts.revision)
        # Speed options first: a LoRA is fused into plain weights, before a plan quantizes or streams them.
        speed = setup_speed(
            pipe,
            dev,
            dt,
            attention_backend=opts.attention,
            fast_lora=opts.fast_lora,
            fast_steps=opts.fast_steps,
            fast_fuse=opts.fast_fuse,
        )
        chosen = choose_plan(pipe, dev, opts.plan, opts.vram_budget_gib)
        chosen.apply(pipe, dev, opts.vram_budget_gib)
        took = time.perf_counter() - start
        log.info("loaded %s on %s (%s, plan %s) in %.1fs", opts.model, dev, dt, chosen.name, took)
        editor = cls(
            pipe,
            model=opts.model,
            device=dev,
            dtype=dt,
            plan=chosen,
            revision=opts.revision,
            fixes=opts.fixes,
            safety=load_filter(opts.safety),
            fault=arm_spec(pipe, opts.fault) if opts.fault else None,
        )
        editor.speed = speed
        if opts.compile:
            editor.enable_compile()
        return editor

    def enable_compile(self, warm_up_size: int = 1024) -> bool:
        """Compile the transformer block (regional) and warm it up; False and eager on failure."""
        from qie.speed.compile import compile_blocks, uncompile_blocks

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
        """Run one edit. Waits up to `timeout` seconds for the GPU (forever when None).

        Whatever the outcome, the request is logged as one JSON line (see `qie.telemetry`).
        """
        if self.compiled:
            request = bucketed(request)
        record = telemetry.RequestRecord(_request_fields(request, self))
        try:
            result = self._edit_guarded(request, on_step=on_step, cancel=cancel, timeout=timeout)
        except BaseException as exc:
            record.finish(_outcome(exc), plan=self.plan.name, **telemetry.error_fields(exc))
            raise
        record.finish(
            "ok",
            timings={k: round(v, 4) for k, v in result.timings.items()},
            peak_vram_gib=result.peak_vram_gib,
            stage_peaks_gib={k: round(v, 3) for k, v in result.stage_peaks_gib.items()},
            plan=result.plan,
            steps_run=result.steps_run,
            notes=list(result.notes),
        )
        return replace(result, request_id=record.request_id)

    def _edit_guarded(self, request: EditRequest, *, on_step, cancel, timeout) -> EditResult:
        if not self.lock.acquire(timeout=-1 if timeout is None else timeout):
            raise BusyError(f"the editor stayed busy for {timeout:.0f}s; try again shortly")
        try:
            if self.safety is not None:
                self.safety.check_inputs(request.images)
            try:
                result = self._edit_with_step_down(request, on_step=on_step, cancel=cancel)
            except CancelledError as exc:
                if not getattr(cancel, "expired", False):  # a `qie.serving.jobs.Deadline` that ran out
                    raise
                raise EditTimeoutError(
                    f"the edit ran past its limit of {cancel.seconds:.0f}s and was stopped ({exc}); "
                    "lower steps or max_side, or try again when the server is less busy"
                ) from None
            if self.safety is not None:
                self.safety.check_output(result.image)
            return result
        finally:
            self.pipe.maybe_free_model_hooks()
            self.lock.release()

    # --- out of memory: free, step down to a smaller plan and retry, or report the numbers -------

    def _edit_with_step_down(self, request: EditRequest, *, on_step, cancel) -> EditResult:
        notes: list[str] = []
        while True:
            try:
                result = self._edit_locked(request, on_step=on_step, cancel=cancel)
                return replace(result, notes=result.notes + tuple(notes))
            except torch.OutOfMemoryError as exc:
                reason = str(exc).splitlines()[0] if str(exc) else "out of memory"
            # Outside the `except`: the traceback, its frames and their tensors are gone now.
            failed_plan, peak = self.plan.name, _peak_gib(self.device)
            self.cache.clear()  # cached embeddings and latents may be what filled the GPU
            free_memory(self.device)
            if not self.step_down():
                raise ResourceError(_oom_message(request, failed_plan, peak, self.device, reason))
            log.warning("out of memory with plan %r (%s); stepped down to %r", failed_plan, reason, self.plan.name)
            notes.append(f"out of memory with plan {failed_plan}; stepped down to {self.plan.name}")

    def step_down(self) -> bool:
        """Apply the plan `qie.memory.plans.next_plan` names after the current one (e.g. resident -> resident-fp8).

        A plan that cannot be applied is skipped with a warning. Returns False when no smaller
        plan is left (always on CPU).
        """
        if self.device.type != "cuda":
            return False
        if self.compiled:  # compiled blocks belong to the old placement
            from qie.speed.compile import uncompile_blocks

            uncompile_blocks(self.pipe.transformer)
            self.compiled = False
        name = next_plan(self.plan.name)
        while name is not None:
            try:
                PLANS[name].apply(self.pipe, self.device, None)
            except (RuntimeError, ValueError, ImportError) as exc:
                log.warning("memory plan %r could not be applied (%s); trying the next one", name, exc)
                free_memory(self.device)
                name = next_plan(name)
                continue
            self.plan = PLANS[name]
            return True
        return False

    # --- end of out-of-memory handling ----------------------------------------------------------

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
        # --- masked edit: the original's pixels outside the region (qie/core/masking.py) ---
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
        `edit` and `qie.serving.batching.edit_batch`.
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


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached CUDA blocks to the driver (after a fault or a plan change)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _oom_message(request: EditRequest, plan: str, peak: float | None, device: torch.device, reason: str) -> str:
    where = "host memory"
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        where = f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB on {device}, peak {peak:.1f} GiB"
    return (
        f"out of memory editing {request.width}x{request.height} with {len(request.images)} image(s), "
        f"{request.steps} steps, CFG {'on' if request.uses_cfg else 'off'}, plan {plan!r} ({where}; {reason}). "
        "No smaller memory plan is left: lower max_side, turn CFG off (true_cfg_scale=1) or use fewer images."
    )


def _request_fields(request: EditRequest, editor: Editor) -> dict[str, Any]:
    return {
        "model": editor.model,
        "size": f"{request.width}x{request.height}",
        "images": len(request.images),
        "steps": request.steps,
        "true_cfg_scale": request.true_cfg_scale,
        "seed": request.seed,
        **telemetry.prompt_fields(request.prompt),
    }


def _outcome(exc: BaseException) -> str:
    kinds = [
        (BusyError, "busy"),
        (EditTimeoutError, "timeout"),
        (CancelledError, "cancelled"),
        (SafetyError, "blocked"),
        (InvalidRequestError, "invalid"),
        (ResourceError, "out_of_memory"),
        (QieError, "failed"),
    ]
    return next((name for cls, name in kinds if isinstance(exc, cls)), "error")


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


def bucketed(request: EditRequest) -> EditRequest:
    """`request` at the nearest compiled size bucket (a new size would recompile the transformer)."""
    from qie.core.geometry import snap_to_bucket

    size = snap_to_bucket(request.width, request.height)
    if size == (request.width, request.height):
        return request
    log.warning(
        "compiled editor: output %dx%d snapped to the size bucket %dx%d (resize_to_input returns the input's size)",
        request.width,
        request.height,
        *size,
    )
    return replace(request, width=size[0], height=size[1], max_side=None)


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


def get_editor(options: LoadOptions | str | None = None, **overrides: Any) -> Editor:
    """The process-wide `Editor`, loaded on first call from `options` (a `LoadOptions` or a model)
    and `overrides`. Without `options` it is configured by the `QIE_*` variables (`LoadOptions.from_env`:
    the model from `$QIE_MODEL`, else the real id; the safety filter from `$QIE_SAFETY`, ...)."""
    global _editor
    with _editor_lock:
        if _editor is None:
            _editor = Editor.load(LoadOptions.from_env() if options is None else options, **overrides)
        return _editor


def _load_options(options: LoadOptions | str, **overrides: Any) -> LoadOptions:
    """`options` (or a model name) with the `overrides` that are not None applied, checked once."""
    base = LoadOptions(model=options) if isinstance(options, str) else options
    changes = {k: v for k, v in overrides.items() if v is not None or k not in ("device", "dtype")}
    return LoadOptions.build({**vars(base), **changes}) if changes else base


def current_editor() -> Editor | None:
    """The process-wide editor if it is loaded, without loading it (for health checks)."""
    return _editor


def set_editor(editor: Editor | None) -> None:
    """Replace (or with None, forget) the process-wide editor, e.g. in tests."""
    global _editor
    with _editor_lock:
        _editor = editor
