"""The speed options of one editor (chosen at load) and of one request (applied around its denoise).

At load, `setup_speed` picks the attention backend (`qie.speed.attention`), on CUDA gives the text
encoder's vision tower its one-call windowed attention (`qie.speed.vision_attention`) and CUDA-graph
replays of its blocks (`qie.speed.vision_graphs`), its language model CUDA-graph replays
(`qie.speed.text_graphs`) and the VAE its single-frame convolutions (`qie.speed.vae_frames`), and
loads the fast-mode LoRA (`qie.speed.fast_mode`) when asked. Per request, `request_speed` applies
fast mode, quantized attention and step caching for the duration of the edit and undoes them
afterwards (try/finally), and hands the denoise loop its early-exit observer
(`qie.speed.early_exit`). Everything it changes or cannot do is said in the result's notes.

Example:
    >>> setup = setup_speed(pipe, device, dtype)                       # doctest: +SKIP
    >>> with request_speed(pipe, setup, request) as run:                # doctest: +SKIP
    ...     latents = stages.denoise(pipe, inputs, stages.LoopControl(observer=run.observer))
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from qie.core.registry import pipeline_variant, variant_spec
from qie.core.request import EditRequest
from qie.errors import InvalidRequestError, ModelLoadError
from qie.speed import attention, early_exit, fa3, text_graphs, vae_frames, vision_attention, vision_graphs
from qie.speed.fast_mode import FastMode, load_fast_mode
from qie.speed.options import LightningSpec

log = logging.getLogger(__name__)

NO_FAST_LORA = "no fast LoRA loaded (load the editor with fast_lora=...)"


@dataclass
class SpeedSetup:
    """What an editor chose at load: its attention backend and, when loaded, its fast-mode LoRA."""

    attention_backend: str = attention.NATIVE
    facts: attention.AttentionFacts | None = None
    fast: FastMode | None = None
    fast_unavailable: str | None = NO_FAST_LORA

    @property
    def default_mode(self) -> str:
        """ "fast" when the Lightning LoRA is fused into the weights (the only mode then), else "quality"."""
        return "fast" if self.fast is not None and self.fast.fused else "quality"

    def mode_for(self, request: EditRequest) -> str:
        """The mode `request` runs in: its own `mode`, else `default_mode`."""
        return request.mode or self.default_mode

    def quantized_attention(self, pipe, mode: str) -> contextlib.AbstractContextManager[str | None]:
        """`attention.quantized_attention` for a request's `attention_quant=mode` on `pipe`'s transformer,
        under this setup's backend: a context yielding the result's note (None for "off")."""
        facts = self.facts or attention.probe_facts(pipe._execution_device, pipe.transformer.dtype)
        return attention.quantized_attention(pipe.transformer, mode, self.attention_backend, facts)


def setup_speed(
    pipe,
    device: torch.device,
    dtype: torch.dtype,
    *,
    attention_backend: str | None = "auto",
    fast_lora: str | None = None,
    fast_steps: int = 8,
    fast_fuse: bool = True,
    lightning: LightningSpec | None = None,
) -> SpeedSetup:
    """Choose and set the attention backend; load the fast LoRA when `fast_lora` is given.

    `lightning` names the published Lightning files (default: those of the loaded transformer's variant).
    A fast LoRA that cannot be found does not stop the load: fast mode is then unavailable,
    with the reason logged at WARNING and kept in `fast_unavailable`.
    """
    facts = attention.probe_facts(device, dtype)
    choice = attention.choose_backend(facts, attention_backend)
    attention.apply_backend(pipe.transformer, choice)
    setup = SpeedSetup(attention_backend=choice.name, facts=facts)
    if device.type == "cuda" and getattr(pipe, "text_encoder", None) is not None:
        vision_attention.install(pipe.text_encoder)  # no host syncs in the vision tower
        vision_graphs.install(pipe.text_encoder)  # so its blocks can replay as CUDA graphs
        text_graphs.install(pipe.text_encoder)  # the language model's layers as one CUDA graph replay
    if device.type == "cuda" and getattr(pipe, "vae", None) is not None:
        vae_frames.install(pipe.vae)  # an image is one frame: 2-D convolutions, no zero frames
    if attention_backend in (None, "auto") and choice.name in fa3.REPLACES and fa3.install(device):
        setup.attention_backend = fa3.NAME
    if fast_lora:
        try:
            spec = lightning or variant_spec(pipeline_variant(pipe)).lightning
            setup.fast = load_fast_mode(pipe, fast_lora, lightning=spec, steps=fast_steps, fuse=fast_fuse)
            setup.fast_unavailable = None
        except ModelLoadError as exc:
            setup.fast_unavailable = f"LoRA not found: {exc}"
            log.warning("fast mode unavailable: %s", setup.fast_unavailable)
    return setup


@dataclass
class RequestRun:
    """How one request actually runs: steps and CFG after fast mode, the observer, and notes."""

    steps: int
    true_cfg_scale: float
    observer: early_exit.TrajectoryEarlyExit | None = None
    cache: early_exit.CacheStats | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def uses_cfg(self) -> bool:
        return self.true_cfg_scale > 1.0

    def steps_run(self, sample: int = 0) -> int:
        """Denoising steps run for `sample` of the batch (early exit stops each sample on its own)."""
        return self.observer.steps_run_of(sample) if self.observer is not None else self.steps

    def finish_notes(self, sample: int = 0) -> tuple[str, ...]:
        """The notes of `sample`, with what early exit and the step cache did."""
        notes = list(self.notes)
        if self.observer is not None:
            steps_run = self.steps_run(sample)
            notes.append(
                f"early exit: stopped after {steps_run} of {self.steps} steps"
                if steps_run < self.steps
                else f"early exit: ran all {self.steps} steps (x0 never settled below the threshold)"
            )
        if self.cache is not None:
            notes.append(self.cache.note())
        return tuple(notes)


@contextlib.contextmanager
def request_speed(pipe, setup: SpeedSetup, request: EditRequest) -> Iterator[RequestRun]:
    """Apply `request`'s speed options for the body; undo them afterwards whatever happens.

    For a batch, `request` is any one of its requests: they share every speed option
    (`qie.core.grouping.batch_key`).
    """
    with contextlib.ExitStack() as stack:
        run = RequestRun(steps=request.steps, true_cfg_scale=request.true_cfg_scale if request.uses_cfg else 1.0)
        mode = setup.mode_for(request)
        if mode == "quality" and setup.default_mode == "fast":
            raise InvalidRequestError(
                "mode",
                mode,
                "this editor has the fast LoRA fused into its weights; use mode='fast', or load the editor "
                "without fast_lora (or with fast_fuse=False) for quality edits",
            )
        if mode == "fast":
            if setup.fast is None:
                reason = setup.fast_unavailable
                log.warning("fast mode unavailable (%s); running the request's own steps and CFG", reason)
                run.notes.append(f"fast mode unavailable: {setup.fast_unavailable}")
            else:
                note = stack.enter_context(setup.fast.active(pipe))
                if request.steps != setup.fast.steps or request.uses_cfg:
                    asked = f"steps={request.steps}, true_cfg_scale={request.true_cfg_scale}"
                    note += f" (the request's {asked} do not apply)"
                run.notes.append(note)
                run.steps, run.true_cfg_scale = setup.fast.steps, 1.0
        note = stack.enter_context(setup.quantized_attention(pipe, request.attention_quant))
        if note:
            run.notes.append(note)
        run.cache = stack.enter_context(
            early_exit.step_cache(
                pipe.transformer,
                request.step_cache,
                threshold=request.step_cache_threshold,
                interval=request.step_cache_interval,
            )
        )
        if request.early_exit_threshold is not None:
            run.observer = early_exit.TrajectoryEarlyExit(
                request.early_exit_threshold, request.early_exit_patience, run.steps
            )
        yield run
