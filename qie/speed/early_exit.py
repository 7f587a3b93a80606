"""Early exit: doing fewer transformer passes than the schedule asks for, per request.

Two independent mechanisms:

- **Step caching** (`step_cache`): diffusers' cache hooks on the transformer. "fbcache" (First
  Block Cache) runs the first block and, when its residual changed by less than `threshold`
  (relative mean absolute difference) since the last full pass, reuses the other blocks' cached
  residual. "taylorseer" runs full passes every `interval` calls and extrapolates the output in
  between (first-order Taylor, lite variant: only the output projection is cached, so the extra
  memory is one output per branch). Hooks are added for one request and removed afterwards.
- **Trajectory early exit** (`TrajectoryEarlyExit`): after each step, the predicted clean latent
  x0 = x_t - sigma * v (flow matching) is compared with the previous step's; when its relative
  change stays below `threshold` for `patience` consecutive steps the loop stops and x0 is decoded.
  The change is read on the host one step late: computed on the GPU at step i, copied to pinned
  memory without waiting, and read at step i+1, once step i+1's forward is queued. Reading it
  then waits only for step i's own work, so the GPU never runs dry waiting for the host (an
  immediate read would stall every step). The cost: the loop stops one step after x0 settled,
  and decodes that newest x0.

Example:
    >>> observer = TrajectoryEarlyExit(threshold=0.01, patience=2, total_steps=40)
    >>> # stages.denoise(..., observer=observer); observer.steps_run tells how far it went
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from qie.errors import InvalidRequestError
from qie.speed.options import STEP_CACHE_MODES

log = logging.getLogger(__name__)

TAYLORSEER_WARMUP_CALLS = 2  # full passes before extrapolating: a first-order expansion needs two


class StepObserver(Protocol):
    """Sees every denoising step; returning latents stops the loop and those latents are decoded."""

    def after_step(self, i: int, latents: torch.Tensor, pred: torch.Tensor, sigma: float) -> torch.Tensor | None:
        """`latents` at step `i` (before the update), the model's velocity `pred`, the step's `sigma`."""

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        """The latents to decode when the loop ran to its end (the observer may replace samples)."""


class HostScalar:
    """A device scalar on its way to the host: the copy is queued now; `value()` waits for it alone.

    On CUDA it goes to pinned memory with `non_blocking=True` and an event behind it, so `value()`
    waits for the work queued before the copy, not for what was queued after (a plain `float(t)`
    waits for everything). On the CPU it is just the tensor.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self.event = None
        if tensor.device.type == "cuda":
            self.host = torch.empty((), dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tensor

    def value(self) -> float:
        if self.event is not None:
            self.event.synchronize()
        return float(self.host)


class _Track:
    """The early-exit state of one sample of a batch."""

    def __init__(self) -> None:
        self.steps_run = 0
        self.changes: list[float] = []  # read one step late (see the module's docstring)
        self.previous: torch.Tensor | None = None
        self.pending: HostScalar | None = None
        self.calm = 0
        self.final: torch.Tensor | None = None  # x0, once this sample stopped

    def observe(self, i: int, clean: torch.Tensor, threshold: float) -> None:
        self.steps_run = i + 1
        if self.pending is not None:  # the previous step's change: its work is done or nearly
            change = self.pending.value()
            self.changes.append(change)
            self.calm = self.calm + 1 if change < threshold else 0
        self.pending = None
        if self.previous is not None:
            change = torch.linalg.vector_norm(clean - self.previous) / torch.linalg.vector_norm(self.previous)
            self.pending = HostScalar(change)
        self.previous = clean


class TrajectoryEarlyExit:
    """Stop when the predicted clean latent has settled: relative change < `threshold` for `patience` steps.

    Each sample of a batch is watched on its own: a sample that settled keeps its x0 while the
    others go on, and the loop stops when every sample has settled. The last step is never cut
    (stopping there saves nothing), so `steps_run` is at most `total_steps`; when the loop stops
    early, `after_step` returns x0 for decoding. A step's change is judged at the next step
    (no host sync in the loop), so the stop comes one step after x0 settled.
    """

    def __init__(self, threshold: float, patience: int, total_steps: int) -> None:
        self.threshold = threshold
        self.patience = patience
        self.total_steps = total_steps
        self.tracks: list[_Track] = []

    def after_step(self, i: int, latents: torch.Tensor, pred: torch.Tensor, sigma: float) -> torch.Tensor | None:
        clean = latents.float() - sigma * pred.float()
        if not self.tracks:
            self.tracks = [_Track() for _ in range(latents.shape[0])]
        for b, track in enumerate(self.tracks):
            if track.final is not None:
                continue
            track.observe(i, clean[b], self.threshold)
            if track.calm >= self.patience and track.steps_run < self.total_steps:
                track.final = clean[b].to(latents.dtype)
        if all(track.final is not None for track in self.tracks):
            return self.finish(latents)
        return None

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        """`latents` with each sample that stopped early replaced by its x0."""
        if not any(track.final is not None for track in self.tracks):
            return latents
        rows = [latents[b] if t.final is None else t.final for b, t in enumerate(self.tracks)]
        return torch.stack(rows)

    def steps_run_of(self, sample: int) -> int:
        """Denoising steps run for `sample` of the batch (0 before the loop started)."""
        return self.tracks[sample].steps_run if self.tracks else 0

    @property
    def steps_run(self) -> int:
        """Steps run by the loop: the most of any sample."""
        return max((t.steps_run for t in self.tracks), default=0)

    @property
    def steps_skipped(self) -> int:
        return self.total_steps - self.steps_run

    @property
    def changes(self) -> list[float]:
        """The relative changes of x0 seen for the first sample (all there is for one edit)."""
        return self.tracks[0].changes if self.tracks else []


@dataclass
class CacheStats:
    """Transformer calls during one request, and how many of them ran the full block stack."""

    mode: str
    calls: int = 0
    computed: int = 0

    @property
    def cached(self) -> int:
        return self.calls - self.computed

    def note(self) -> str:
        return f"step_cache={self.mode}: {self.cached} of {self.calls} transformer calls served from the cache"


def cache_config(mode: str, *, threshold: float, interval: int, dtype: torch.dtype):
    """The diffusers cache config for `mode` ("fbcache" or "taylorseer")."""
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if mode == "fbcache":
        return FirstBlockCacheConfig(threshold=threshold)
    if mode == "taylorseer":
        return TaylorSeerCacheConfig(
            cache_interval=interval,
            disable_cache_before_step=TAYLORSEER_WARMUP_CALLS,
            max_order=1,
            taylor_factors_dtype=dtype,
            use_lite_mode=True,
        )
    raise InvalidRequestError("step_cache", mode, f"use one of {STEP_CACHE_MODES}")


@contextlib.contextmanager
def step_cache(
    transformer: torch.nn.Module, mode: str, *, threshold: float, interval: int
) -> Iterator[CacheStats | None]:
    """Enable the `mode` cache on `transformer` for the body and count the calls it served.

    The hooks say nothing about what they skipped, so the count comes from the last block's
    attention: a pass that computed the block stack calls its query projection, a cached one
    does not. The cache is disabled afterwards whatever happens.
    """
    if mode == "off":
        yield None
        return
    stats = CacheStats(mode)
    probe = _last_block_probe(transformer)
    if transformer._cache_config is not None:  # left over from an interrupted request
        log.warning("a transformer cache was still enabled; disabling it before this request")
        transformer.disable_cache()
    transformer.enable_cache(cache_config(mode, threshold=threshold, interval=interval, dtype=transformer.dtype))
    handles = [
        transformer.register_forward_pre_hook(lambda *_: _count(stats, "calls")),
        probe.register_forward_pre_hook(lambda *_: _count(stats, "computed")),
    ]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
        transformer.disable_cache()


def _count(stats: CacheStats, name: str) -> None:
    setattr(stats, name, getattr(stats, name) + 1)


def _last_block_probe(transformer: torch.nn.Module) -> torch.nn.Module:
    return transformer.transformer_blocks[-1].attn.to_q
