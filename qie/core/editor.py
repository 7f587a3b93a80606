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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from PIL import Image

from qie import telemetry
from qie.core import encode_cache as cache
from qie.core import image_prep, masking, stages
from qie.core.faults import Fault, arm_spec
from qie.core.grouping import check_batchable, condition_area
from qie.core.images import ImageInput
from qie.core.load_options import RESIDENT_PLANS, LoadOptions, auto_vae_compile
from qie.core.loras import LoraSpec, fuse_loras, lora_notes
from qie.core.models import load_pipeline, resolve_dtype, resolve_target
from qie.core.registry import DEFAULT_MODEL, ModelSpec, pipeline_variant, spec_for_pipeline
from qie.core.request import EditRequest, EditResult
from qie.core.rewrite import DEFAULT_MAX_NEW_TOKENS, check_language, check_max_new_tokens, generate_rewrite
from qie.core.safety import SafetyFilter, load_filter
from qie.core.speed_setup import RequestRun, SpeedSetup, request_speed, setup_speed
from qie.errors import (
    BusyError,
    CancelledError,
    EditTimeoutError,
    InvalidRequestError,
    QieError,
    ResourceError,
    SafetyError,
)
from qie.memory.plans import PLANS, Plan, batch_cfg_pays, choose_plan, next_plan
from qie.speed.fa3 import NAME as FA3
from qie.speed.fa3 import installed as installed_fa3
from qie.speed.transformer_graphs import TransformerGraphs
from qie.telemetry import StageTimer
from qie.versions import warn_known_problems

log = logging.getLogger(__name__)

# Per-load switches for qie's deliberate differences from stock diffusers.
DEFAULT_FIXES = {"mm_token_type_ids": True}


class Editor:
    """Owns a loaded `QwenImageEditPlusPipeline`; `edit` runs one request, `edit_batch` several in one loop."""

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
        self.variant = pipeline_variant(pipe)  # "2509" or "2511", from the transformer config
        self.loras: tuple[LoraSpec, ...] = ()  # user LoRAs fused into the weights; set by `load`
        self.lock = threading.Lock()
        self.compiled = False
        self.compile_stats: dict[str, Any] = {}  # compile mode, warm-up and first-edit seconds (`enable_compile`)
        self.cache = cache.EditCache()  # prompt embeddings and condition latents (qie/core/encode_cache.py)
        self.speed = SpeedSetup()  # attention backend and fast mode; set by `load`
        self.predictor: stages.Predictor | None = None  # set by qie.serving.parallel for CFG-parallel runs
        self.batched_cfg = stages.BatchedCfg()  # both CFG branches in one call (requests' `batch_cfg`)
        self.graphs: TransformerGraphs | None = None  # the forward's CUDA graphs (`enable_graphs`)
        self.graphs_setting = "off"  # what `enable_graphs` was last asked (a step down asks again)
        self._batch_cfg_pays: bool | None = None  # the cost model's verdict for this plan, once asked
        self._prediction_logged = False  # predicted vs measured step time, logged after the first edit
        self._warming_up = False
        pipe.set_progress_bar_config(disable=True)
        self.safety = safety
        self.fault = fault

    @classmethod
    def load(
        cls,
        options: LoadOptions | str = DEFAULT_MODEL,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        **overrides: Any,
    ) -> Editor:
        """Load a model and place it with a memory plan, as `options` say (see `LoadOptions`).

        `options` is a `LoadOptions` or a model: a registry name ("2509", "2511", "tiny",
        "tiny-2511"; see `qie.core.registry`), a hub id or a local pipeline folder; `device`,
        `dtype` and keyword `overrides` (any `LoadOptions` field) replace its values. `loras`
        (`PATH_OR_REPO[:SCALE]` each; see `qie.core.loras`) are fused into the transformer in
        order, before the fast LoRA and the memory plan. With `compile=True` (CUDA only) the
        transformer block is compiled and warmed up once at 1024²; if compiling fails, the editor
        logs a warning and runs eager.

        Example:
            >>> Editor.load("2511", loras=["ink.safetensors:0.8"])                     # doctest: +SKIP
            >>> Editor.load(LoadOptions(model="tiny", fast_lora="lightning.safetensors"))  # doctest: +SKIP
        """
        opts = _load_options(options, device=device, dtype=dtype, **overrides)
        resolved, dev = resolve_target(opts.model, opts.device)
        dt = resolve_dtype(dev, opts.dtype)
        warn_known_problems()
        start = time.perf_counter()
        pipe = load_pipeline(resolved, device=dev, dtype=dt, revision=opts.revision)
        spec: ModelSpec = spec_for_pipeline(resolved.spec, pipe)
        # LoRAs first: they are fused into plain weights, before a plan quantizes or streams them.
        fused = fuse_loras(pipe, opts.loras)
        if opts.text_encoder_fp8:
            from qie.memory.quantize import store_text_encoder_fp8

            store_text_encoder_fp8(pipe.text_encoder, dt)
        speed = setup_speed(
            pipe,
            dev,
            dt,
            attention_backend=opts.attention,
            fast_lora=opts.fast_lora,
            fast_steps=opts.fast_steps,
            fast_fuse=opts.fast_fuse,
            lightning=spec.lightning,
        )
        chosen = choose_plan(pipe, dev, opts.plan, opts.vram_budget_gib)
        chosen.apply(pipe, dev, opts.vram_budget_gib)
        if opts.vae_compile not in ("off", "auto"):  # "auto": with the transformer, in `enable_compile`
            from qie.speed.compile import compile_vae

            compile_vae(pipe.vae, opts.vae_compile)
        took = time.perf_counter() - start
        log.info("loaded %s (%s) on %s (%s, plan %s) in %.1fs", resolved.name, spec.variant, dev, dt, chosen.name, took)
        editor = cls(
            pipe,
            model=resolved.name,
            device=dev,
            dtype=dt,
            plan=chosen,
            revision=opts.revision,
            fixes=opts.fixes,
            safety=load_filter(opts.safety),
            fault=arm_spec(pipe, opts.fault) if opts.fault else None,
        )
        editor.speed = speed
        editor.loras = fused
        if opts.compile:
            editor.enable_compile(mode=opts.compile_mode, vae_compile=auto_vae_compile(opts.vae_compile, chosen.name))
        editor.enable_graphs(opts.transformer_graphs)
        return editor

    @property
    def weights_id(self) -> str:
        """The model and the LoRAs fused into it (full sources and scales): what a cached result must match."""
        return " + ".join([self.model, *(f"{lora.source}:{lora.scale:g}" for lora in self.loras)])

    def enable_compile(self, warm_up_size: int = 1024, mode: str = "default", vae_compile: str = "off") -> bool:
        """Compile the transformer block (regional, `torch.compile` `mode`) and warm it up; False and eager on failure.

        `vae_compile` ("on", "channels-last") compiles the VAE (decoder and encoder) too, before the warm-up, so its
        compile is part of it. `compile_stats` then holds the mode and the warm-up seconds; the first
        edit after it adds its own time.
        """
        from qie.speed.compile import (
            check_mode,
            check_vae_mode,
            compile_blocks,
            compile_vae,
            uncompile_blocks,
            uncompile_vae,
        )

        check_mode(mode)
        check_vae_mode(vae_compile)
        if self.device.type != "cuda" or self.plan.name == "model-offload":
            log.warning("compile skipped: it needs CUDA and a plan other than model-offload (plan %s)", self.plan.name)
            return False
        if not compile_blocks(self.pipe.transformer, mode=mode):
            return False
        compile_vae(self.pipe.vae, vae_compile)
        start = time.perf_counter()
        try:
            self.warm_up(warm_up_size)
        except Exception as exc:  # an unsupported op shows up only when the graph is traced
            log.warning("compiled warm-up failed (%s: %s); running eager", type(exc).__name__, exc)
            uncompile_blocks(self.pipe.transformer)
            uncompile_vae(self.pipe.vae)
            return False
        self.compiled = True
        self.compile_stats = {"mode": mode, "warm_up_s": time.perf_counter() - start}
        log.info("compiled (mode %s) and warmed up in %.0fs", mode, self.compile_stats["warm_up_s"])
        return True

    def enable_graphs(self, setting: str = "auto") -> bool:
        """Replay the transformer's forward as CUDA graphs where edits repeat their shapes
        (`qie.speed.transformer_graphs`); whether they are on.

        "on": on CUDA with a resident plan (the weights stay where a graph reads them); "auto": there too
        when the blocks are compiled in a mode without CUDA graphs of its own; "off": never.
        """
        from qie.speed.compile import CUDA_GRAPH_MODES

        self.graphs_setting = setting
        on = self.device.type == "cuda" and self.plan.name in RESIDENT_PLANS
        if setting == "auto":
            on = on and self.compiled and self.compile_stats.get("mode") not in CUDA_GRAPH_MODES
        self.graphs = TransformerGraphs(self.pipe.transformer) if on and setting != "off" else None
        if self.graphs is not None:
            log.info("transformer: CUDA graphs for edits that repeat their shapes (transformer_graphs=%s)", setting)
        return self.graphs is not None

    def warm_up(self, size: int = 1024) -> None:
        """Run the edits that trace every graph a compiled transformer needs, so no real edit compiles.

        Each batch size gets its own graph (dynamo specializes a dimension of size 1): the batch-2
        call of batched CFG and the batch-1 call of fast mode (no CFG, no negative prompt). The
        blocks are traced dynamic in the image and text token counts from their first call
        (`qie.speed.compile.mark_token_dims`), so those two graphs serve every prompt length and
        output size. The warm-up still runs both calls at two prompt lengths and two sizes
        (`second_warm_up_size`): where nothing is left to compile they cost a few steps each, and
        `tests/speed/test_compile.py::test_after_the_warm_up_no_edit_compiles_again` holds either way.
        """
        second = second_warm_up_size(size)
        edits = [
            (f"CFG edit at {size}²", warm_up_request(size)),  # both CFG branches in one call where that pays
            (f"CFG edit at {size}², longer prompt", replace(warm_up_request(size), prompt=WARM_UP_PROMPT_LONG)),
            (f"one-branch calls at {size}²", replace(warm_up_request(size), batch_cfg=False)),  # batch 1
            (f"CFG edit at {second}²", warm_up_request(second)),  # each graph at a second image length
            (f"one-branch calls at {second}²", replace(warm_up_request(second), batch_cfg=False)),
        ]
        start = time.perf_counter()
        self._warming_up = True
        try:
            for number, (label, request) in enumerate(edits, 1):
                log.info(
                    "compile warm-up %d/%d: %s (%.0fs so far; a first trace takes minutes without the disk cache)",
                    number,
                    len(edits),
                    label,
                    time.perf_counter() - start,
                )
                self.edit(request)
        finally:
            self._warming_up = False

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
        return self.edit_batch([request], on_step=on_step, cancel=cancel, timeout=timeout)[0]

    def edit_batch(
        self,
        requests: Sequence[EditRequest],
        *,
        on_step: stages.StepCallback | None = None,
        cancel: threading.Event | None = None,
        timeout: float | None = None,
    ) -> list[EditResult]:
        """Run `requests` as one denoising batch, through the same steps as `edit`; results in order.

        The requests must share `qie.core.grouping.batch_key` (output size, steps, CFG, speed
        options, condition grids); `qie.core.grouping.group_by_key` groups any list. Each keeps its
        own images, prompts, seed, tiling and region. Every option, the caches, `on_step` (called
        once per step of the batch) and `cancel` (stops the whole batch) apply as for one edit. Out
        of memory, a batch raises `ResourceError` without stepping down the plan: split it and retry.
        Each result's `timings` are the batch's; a batch of N > 1 adds the note "batch of N".
        Results match one-by-one edits within `TOLERANCES["batching"]`.

        Example:
            >>> results = editor.edit_batch([request_a, request_b])          # doctest: +SKIP
            >>> [r.notes[0] for r in results]                                # doctest: +SKIP
            ['batch of 2', 'batch of 2']
        """
        if self.compiled:
            requests = [bucketed(r) for r in requests]
        requests = list(requests)
        if not requests:
            return []
        check_batchable(requests)
        records = [telemetry.RequestRecord(_request_fields(r, self)) for r in requests]
        start = time.perf_counter()
        try:
            results = self._edit_guarded(requests, on_step=on_step, cancel=cancel, timeout=timeout)
        except BaseException as exc:
            for record in records:
                record.finish(_outcome(exc), plan=self.plan.name, **telemetry.error_fields(exc))
            raise
        if self.compiled and "first_edit_s" not in self.compile_stats:
            self.compile_stats["first_edit_s"] = time.perf_counter() - start
        if not self._prediction_logged and not self._warming_up and self.device.type == "cuda":
            self._prediction_logged = True
            log_prediction(self, requests[0], results[0])
        return [_finish_record(record, result) for record, result in zip(records, results, strict=True)]

    def _edit_guarded(self, requests: list[EditRequest], *, on_step, cancel, timeout) -> list[EditResult]:
        if not self.lock.acquire(timeout=-1 if timeout is None else timeout):
            raise BusyError(f"the editor stayed busy for {timeout:.0f}s; try again shortly")
        try:
            if self.safety is not None:
                for request in requests:
                    self.safety.check_inputs(request.images)
            control = stages.LoopControl(on_step=on_step, cancel=cancel, predict=self.predictor)
            try:
                results = self._edit_with_step_down(requests, control)
            except CancelledError as exc:
                if not getattr(cancel, "expired", False):  # a `qie.serving.jobs.Deadline` that ran out
                    raise
                raise EditTimeoutError(
                    f"the edit ran past its limit of {cancel.seconds:.0f}s and was stopped ({exc}); "
                    "lower steps or max_side, or try again when the server is less busy"
                ) from None
            if self.safety is not None:
                for result in results:
                    self.safety.check_output(result.image)
            return results
        finally:
            release_hooks(self.pipe)
            self.lock.release()

    # --- out of memory: free, step down to a smaller plan and retry, or report the numbers -------

    def _edit_with_step_down(self, requests: list[EditRequest], control: stages.LoopControl) -> list[EditResult]:
        notes: list[str] = []
        while True:
            try:
                results = self._edit_locked(requests, control)
                return [replace(result, notes=result.notes + tuple(notes)) for result in results]
            except torch.OutOfMemoryError as exc:
                reason = str(exc).splitlines()[0] if str(exc) else "out of memory"
            # Outside the `except`: the traceback, its frames and their tensors are gone now.
            failed_plan, peak = self.plan.name, _peak_gib(self.device)
            self.cache.clear()  # cached embeddings and latents may be what filled the GPU
            free_memory(self.device)
            # A batch that does not fit is split by the caller before the plan is degraded for good.
            if len(requests) > 1 or not self.step_down():
                raise ResourceError(_oom_message(requests, failed_plan, peak, self.device, reason))
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
            self._batch_cfg_pays = None  # ask the cost model again for the new plan
            self.enable_graphs(self.graphs_setting)  # the new plan and the compile undone decide again
            return True
        return False

    # --- end of out-of-memory handling ----------------------------------------------------------

    def _edit_locked(self, requests: list[EditRequest], control: stages.LoopControl) -> list[EditResult]:
        """encode_prompt, encode_condition, denoise, decode for the batch; the caller holds the lock."""
        pipe, first = self.pipe, requests[0]
        timer = StageTimer(self.device)
        with torch.inference_mode(), request_speed(pipe, self.speed, first) as run:
            chosen: list[stages.Predictor | None] = []

            def choose_predictor() -> None:  # its weight check runs while the first request's images resize
                with telemetry.step_range("predictor"):
                    chosen.append(self._predictor(first, run, control.predict))

            encoded = [
                self.encode(r, timer, uses_cfg=run.uses_cfg, meanwhile=None if i else choose_predictor)
                for i, r in enumerate(requests)
            ]
            predict = chosen[0]
            with timer("denoise"):
                with telemetry.step_range("prepare"):
                    inputs = stages.prepare(
                        pipe,
                        [e for e, _ in encoded],
                        [r.seed for r in requests],
                        width=first.width,
                        height=first.height,
                        steps=run.steps,
                        true_cfg_scale=run.true_cfg_scale,
                    )
                latents = stages.denoise(pipe, inputs, replace(control, observer=run.observer, predict=predict))
                if isinstance(predict, stages.GraphedPrediction):
                    run.notes.append(predict.note())
            with timer("decode"):
                images = [
                    stages.decode(pipe, latents[i : i + 1], r.width, r.height, tile=r.tiling)
                    for i, r in enumerate(requests)
                ]
        if len(requests) > 1:
            log.info("denoised a batch of %d (%dx%d, %d steps)", len(requests), first.width, first.height, run.steps)
        batch_note = (f"batch of {len(requests)}",) if len(requests) > 1 else ()
        results = []
        for i, (request, image, (_, notes)) in enumerate(zip(requests, images, encoded, strict=True)):
            image = finish_image(request, image, notes)  # adds its own notes
            results.append(self._result(request, image, timer, run, i, (*batch_note, *run.finish_notes(i), *notes)))
        return results

    def _result(
        self, request: EditRequest, image: Image.Image, timer: StageTimer, run: RequestRun, i: int, notes: tuple
    ) -> EditResult:
        return EditResult(
            image=image,
            seed=request.seed,
            timings=dict(timer.timings),
            peak_vram_gib=timer.peak_vram_gib(),
            stage_peaks_gib=dict(timer.peaks_gib),
            model=self.model,
            revision=self.revision,
            plan=self.plan.name,
            steps_run=run.steps_run(i),
            steps_skipped=run.steps - run.steps_run(i),
            notes=(*notes, *lora_notes(self.loras)),
            cached_calls=run.cache.cached if run.cache is not None else 0,
        )

    @property
    def uses_fa3(self) -> bool:
        """Whether FlashAttention-3 serves the transformer's joint attention (`qie.speed.fa3`)."""
        return self.speed.attention_backend == FA3 or installed_fa3()

    def _predictor(self, request: EditRequest, run, predict: stages.Predictor | None) -> stages.Predictor | None:
        """`predict` (CFG-parallel's) if set, else the transformer's CUDA graphs for a one-branch edit when on,
        else batched CFG where asked or (`batch_cfg=None`) predicted to pay.

        Step caches keep one cache per branch, so they always get two calls (and no graph).
        """
        if predict is not None or run.cache is not None:
            return predict
        if not run.uses_cfg and self.graphs is not None and self.fault is None:
            edit = self.graphs.start_edit()
            if edit is not None:  # what the request changed in the transformer is part of each graph's key
                variant = (self.speed.mode_for(request), request.attention_quant)
                return stages.GraphedPrediction(self.graphs, edit, variant)
        batched = request.batch_cfg
        if batched is None:
            if self._batch_cfg_pays is None:
                self._batch_cfg_pays = batch_cfg_pays(self.pipe, self.device, self.plan.name, fa3=self.uses_fa3)
            batched = self._batch_cfg_pays
        return self.batched_cfg if batched else None

    def encode(
        self,
        request: EditRequest,
        timer: StageTimer,
        uses_cfg: bool | None = None,
        meanwhile: Callable[[], None] | None = None,
    ) -> tuple[stages.Encoded, list[str]]:
        """VAE-encode and text-encode (prompt, negative) one request, through the condition/prompt
        cache; the caller holds the lock. Returns the encodings and notes on cache hits.

        `uses_cfg` overrides the request's CFG setting (fast mode runs without CFG). `meanwhile` runs
        on this thread while the text encoder's images are still resizing on the worker (the edit's
        weight check for its transformer graphs: host work that would otherwise hold the GPU later).
        """
        pipe, device = self.pipe, self.device
        self.cache.bind(pipe)
        notes: list[str] = []
        ids = {"model": self.model, "revision": self.revision}
        # The condition first: its VAE encode runs on the GPU while the host prepares the text encoder's
        # images (the timer does not wait between stages), and its latents take the prompt's dtype.
        with timer("condition_encode"):
            small = image_prep.prompt_images_later(pipe, request.images)  # on another core from here on
            with telemetry.step_range("digests"):
                ids["digests"] = cache.digests_of(request.images)  # both stages' cache keys: hashed once
            area = condition_area(request)
            if request.condition_area is None:
                notes.append(f"condition_area=auto: {request.condition_area_used}")
            condition, hit = cache.encode_condition(
                self.cache, pipe, request, **ids, area=area, device=device, dtype=pipe.text_encoder.dtype
            )
            notes += ["condition cache hit"] if hit else []
        with timer("text_encode"):
            if meanwhile is not None:
                meanwhile()
            prompt, negative, hit = cache.encode_prompts(
                self.cache, pipe, request, **ids, fixes=self.fixes, device=device, uses_cfg=uses_cfg, small=small
            )
            if hit:
                notes.insert(0, "prompt cache hit")
        return stages.Encoded(prompt, negative, condition), notes

    def rewrite_prompt(
        self,
        images: Sequence[ImageInput] | ImageInput,
        prompt: str,
        language: str = "en",
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        timeout: float | None = None,
    ) -> str:
        """A precise edit instruction written from the short `prompt` by the text encoder, seeing `images`.

        `language` is "en" or "zh"; at most `max_new_tokens` tokens are generated (greedy, so the
        same inputs give the same text). Holds the GPU lock like `edit` (waits up to `timeout`
        seconds). When the model writes nothing usable, the original prompt comes back (WARNING).

        Example:
            >>> editor.rewrite_prompt(["shoe.jpg"], "white background")      # doctest: +SKIP
        """
        check = EditRequest(images=images, prompt=prompt)  # the same checks as an edit's images and prompt
        language, max_new_tokens = check_language(language), check_max_new_tokens(max_new_tokens)
        if not self.lock.acquire(timeout=-1 if timeout is None else timeout):
            raise BusyError(f"the editor stayed busy for {timeout:.0f}s; try again shortly")
        try:
            if self.safety is not None:
                self.safety.check_inputs(check.images)
            text = generate_rewrite(
                self.pipe,
                check.images,
                check.prompt,
                language=language,
                max_new_tokens=max_new_tokens,
                device=self.device,
            )
        finally:
            release_hooks(self.pipe)
            self.lock.release()
        try:
            return EditRequest(images=check.images, prompt=text).prompt  # usable as an edit's prompt
        except InvalidRequestError as exc:
            log.warning("prompt rewrite gave no usable instruction (%s); keeping the prompt as given", exc)
            return check.prompt

    def reference(self, request: EditRequest) -> Image.Image:
        """The stock diffusers call, unchanged, for the same request: the oracle for tests and benchmarks."""
        with self.lock:
            try:
                return run_stock(self.pipe, request)
            finally:
                self.pipe.maybe_free_model_hooks()


def release_hooks(pipe: Any) -> None:
    """`pipe.maybe_free_model_hooks()` after an edit or a prompt rewrite, when it has work to do: the
    model-offload plan's hooks (`enable_model_cpu_offload`) or a diffusers step cache left enabled on the
    transformer.

    Its other work, resetting stateful diffusers hooks, walks every module of every component
    (0.020 s of the fast edit's host time under cProfile on an H200); qie's step caches remove their hooks
    at the end of each request (`qie.speed.early_exit.step_cache`), so there is nothing to reset.
    """
    if getattr(pipe, "_all_hooks", None) or getattr(getattr(pipe, "transformer", None), "_cache_config", None):
        pipe.maybe_free_model_hooks()


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached CUDA blocks to the driver (after a fault or a plan change)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def finish_image(request: EditRequest, image: Image.Image, notes: list[str]) -> Image.Image:
    """The decoded image at the size asked for, with the original kept outside a mask or box; notes say so."""
    if request.resize_to_input:
        image = image.resize(request.input_size, Image.Resampling.LANCZOS)
    # --- masked edit: the original's pixels outside the region (qie/core/masking.py) ---
    if request.has_region:
        image = masking.keep_outside_region(request, image)
        notes.append(f"kept the original outside the {'mask' if request.mask is not None else 'box'}")
    if request.tiling is not None:
        notes.append(f"VAE tiled ({request.tile_size} px tiles, {request.tile_overlap} px overlap)")
    return image


def _finish_record(record: telemetry.RequestRecord, result: EditResult) -> EditResult:
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


def _oom_message(
    requests: Sequence[EditRequest], plan: str, peak: float | None, device: torch.device, reason: str
) -> str:
    request = requests[0]
    where = "host memory"
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        where = f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB on {device}, peak {peak:.1f} GiB"
    if len(requests) > 1:
        what, fix = f" in a batch of {len(requests)}", "Edit fewer requests at once, or one at a time."
    else:
        what = ""
        fix = "No smaller memory plan is left: lower max_side, turn CFG off (true_cfg_scale=1) or use fewer images."
    return (
        f"out of memory editing {request.width}x{request.height}{what} with {len(request.images)} image(s), "
        f"{request.steps} steps, CFG {'on' if request.uses_cfg else 'off'}, plan {plan!r} ({where}; {reason}). {fix}"
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
    """`request` at the nearest compiled size bucket (the compiled code meets a bounded set of shapes)."""
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


# A second prompt length for the warm-up (any length other than "warm up"'s).
WARM_UP_PROMPT_LONG = "warm up the compiled transformer blocks at a second, longer prompt length"


def second_warm_up_size(size: int) -> int:
    """The warm-up's second output side: half of `size`, a multiple of 64 (512 for 1024).

    Example:
        >>> second_warm_up_size(1024), second_warm_up_size(256)
        (512, 128)
    """
    return max(64, size // 2 // 64 * 64)


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


def log_prediction(editor: Editor, request: EditRequest, result: EditResult) -> None:
    """Log the cost model's step time (`qie.memory.cost`) beside the one `result` measured.

    Tokens are counted as the output's plus as many for the condition (a condition encoded at the
    output's area); a first edit that compiles or warms caches measures slower than later ones.
    """
    from qie.memory.cost import predict_pipe

    steps = result.steps_run or 0
    if not steps or "denoise" not in result.timings:
        return
    tokens = 2 * (request.width // 16) * (request.height // 16)
    try:
        p, gpu = predict_pipe(editor.pipe, editor.device, editor.plan.name, tokens=tokens, fa3=editor.uses_fa3)
    except Exception as exc:  # a log line must never fail an edit
        log.debug("no prediction: %s", exc)
        return
    fast = editor.speed.fast is not None and editor.speed.mode_for(request) == "fast"
    cfg = request.uses_cfg and not fast  # fast mode runs without CFG
    predicted = (p.cfg_batched_s if editor._batch_cfg_pays else p.cfg_two_calls_s) if cfg else p.forward_s
    measured = result.timings["denoise"] / steps
    log.info(
        "plan %s on %s: predicted %.3fs per step%s, measured %.3fs (%+.0f%%) over %d steps of the first edit",
        editor.plan.name,
        gpu.label,
        predicted,
        " with CFG" if cfg else "",
        measured,
        100 * (measured / predicted - 1),
        steps,
    )
