"""The transformer's forward replayed as a CUDA graph, one per call shape, for edits whose shapes repeat.

With the blocks compiled and in fp8, a forward launches dozens of kernels per block (60 blocks) from
Python, and the H200 machines measured took 74-136 ms of host time for that: more than the GPU takes
to run them at 512² (~46 ms) and, on the slower hosts, at 768² (~100 ms), so there the GPU waits. A
CUDA graph records one forward's launches once and replays them as one (under 2 ms of host time).

A graph serves calls whose shapes it was recorded for (batch, image and text tokens, image shapes,
and the request's speed variant: fast or quality mode, quantized attention), so it pays where edits
repeat: bulk edits of one instruction at one size, where the prompt, images and output keep their
token counts. Recording costs about one forward of host time, so a shape is recorded only when
a later edit meets it again: the first edit with a shape runs as before, the next records at its
first step and replays from there, and every later one replays all its steps. Up to `max_graphs`
shapes are kept (least recently used dropped) in one memory pool: about one forward's activations,
held between edits.

Only calls a graph can replay take this path: on CUDA, one prompt without a mask (diffusers copies
a masked prompt's length from the host on every call), no CFG branch pair, no step cache, every
weight on the GPU without an offloading hook, and not 2511's `zero_cond_t` (its forward builds the
modulation index on the host). Weights moved, quantized or replaced drop the graphs
(`qie.speed.cuda_graphs.weight_addresses`); `skipped` says why an edit could not replay. A recording
that fails turns the graphs off for good, said once.

Example:
    >>> graphs = TransformerGraphs(pipe.transformer)                                     # doctest: +SKIP
    >>> edit = graphs.start_edit()                                                       # doctest: +SKIP
    >>> out = graphs(edit, forward, ("fast",), hidden_states=x, timestep=t, encoder_hidden_states=e)  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qie.speed.cuda_graphs import record, weight_addresses

log = logging.getLogger(__name__)

MAX_GRAPHS = 4
MAX_SEEN = 256  # shapes remembered as met (for the next edit to record), least recent forgotten first


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph, or what `record` returned
    inputs: dict[str, torch.Tensor]  # the buffers the graph reads
    out: torch.Tensor  # the buffer its replays write, in the pool


class TransformerGraphs:
    """The CUDA graphs of one transformer's forward (see the module doc).

    `record` and `weights` are `qie.speed.cuda_graphs`' `record` and `weight_addresses` by default (tests
    pass stand-ins).
    """

    def __init__(
        self,
        transformer: nn.Module,
        max_graphs: int = MAX_GRAPHS,
        *,
        record: Callable[..., tuple[Any, torch.Tensor]] = record,
        weights: Callable[[nn.Module], tuple[int, ...] | str] = weight_addresses,
    ) -> None:
        self.transformer = transformer
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self.seen: OrderedDict[Hashable, int] = OrderedDict()  # shape key -> the last edit that called it
        self.weights: tuple[int, ...] | None = None  # the weight addresses the graphs were recorded with
        self.pool: Any = None
        self.disabled: str | None = None  # why the graphs are off for good (a recording failed)
        self.skipped: str | None = None  # why the last edit could not replay, if it could not
        self._record, self._weights = record, weights
        self._edits = itertools.count(1)
        self.recorded = 0  # graphs recorded so far (also those dropped since)
        self.last: str | None = None  # what the last call did: "replayed", "recorded" (and replayed), "as it is"

    def start_edit(self) -> int | None:
        """A number for the edit about to run, or None when no call of it can replay: the graphs are off,
        2511's `zero_cond_t`, or a weight off the GPU or hooked. Drops the graphs if the weights moved."""
        self.skipped = self.disabled or (
            "2511's zero_cond_t" if getattr(self.transformer, "zero_cond_t", False) else None
        )
        if self.skipped:
            return None
        weights = self._weights(self.transformer)
        if isinstance(weights, str):
            self.skipped = weights
            return None
        if weights != self.weights:  # moved, quantized or replaced since the graphs were recorded
            self.clear()
            self.weights = weights
        return next(self._edits)

    def __call__(
        self, edit: int, forward: Callable[..., torch.Tensor], variant: Hashable, **inputs: torch.Tensor
    ) -> torch.Tensor:
        """`forward(**inputs)`, replayed from the graph of the inputs' shapes and `variant` when there is one,
        recorded now when an earlier edit made the same call, else run as it is."""
        key = (variant, *((name, tuple(t.shape), t.dtype, t.device) for name, t in sorted(inputs.items())))
        graph = self.graphs.get(key)
        self.last = "replayed"
        if graph is None:
            self.last = "as it is"
            if self.disabled or self.seen.get(key, edit) == edit:  # new, or only this edit made the call
                self.seen[key] = edit
                self.seen.move_to_end(key)
                if len(self.seen) > MAX_SEEN:
                    self.seen.popitem(last=False)
                return forward(**inputs)
            graph = self._add(key, forward, inputs)
            if graph is None:
                return forward(**inputs)
            self.last = "recorded"
        self.graphs.move_to_end(key)
        for name, tensor in inputs.items():
            graph.inputs[name].copy_(tensor)
        graph.graph.replay()
        return graph.out.clone()  # the buffer is the next replay's

    def clear(self) -> None:
        """Drop every graph (their pool is freed once the last one goes)."""
        self.graphs.clear()
        self.seen.clear()
        self.pool = None

    def _add(
        self, key: Hashable, forward: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor]
    ) -> _Graph | None:
        buffers = {name: tensor.clone() for name, tensor in inputs.items()}
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        try:
            graph, out = self._record(lambda: forward(**buffers), self.pool, error_mode="thread_local")
        except torch.OutOfMemoryError:
            raise  # the editor's out-of-memory handling frees memory or steps down; not a reason to stop recording
        except Exception as exc:  # a build whose forward cannot be captured: as it is from now on, said once
            self.disabled = f"{type(exc).__name__}: {exc}"
            self.clear()
            log.warning("transformer: CUDA graphs off (%s); running as it is", self.disabled)
            return None
        if self.pool is None:  # the first graph's pool serves the others
            self.pool = graph.pool()
        self.recorded += 1
        shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in sorted(inputs.items()))
        log.info("transformer: recorded the forward's CUDA graph for %s", shapes)
        self.graphs[key] = _Graph(graph, buffers, out)
        return self.graphs[key]
