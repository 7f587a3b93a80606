"""The text encoder's vision blocks replayed as CUDA graphs, one per block, chained through their buffers.

With its windowed attention as one masked call (`qie.speed.vision_attention`) the vision tower never
waits for the GPU, but its 32 blocks still launch ~20 small kernels each for a few hundred patches:
launching them takes the host longer than the GPU takes to run them. `install` gives every block
of the tower a forward that replays a CUDA graph of that block, recorded at its first use for the
patch count, mask size and position-embedding shape of the call. A block's graph reads the previous
block's output buffer directly, so a pass copies in only the first block's input, the rotary
position embeddings and the window boundaries (`cu_seqlens`); the last block's output is cloned.
The graphs run the same kernels on the same inputs as the eager blocks (GPU test: equal bit for bit).

Only calls a graph can replay take this path: on CUDA, under `torch.inference_mode` (as edits run),
the masked attention installed, position embeddings given, no other keyword arguments that carry
values, no forward hooks on the block, every weight of the tower on the GPU with no offloading hook.
Every other call runs the block's own forward. Graphs are dropped when the tower's weights move (a
plan change, fp8 storage), and a failed recording turns the graphs off for good, said once.

Example:
    >>> install(pipe.text_encoder)  # doctest: +SKIP
    32
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qie.speed import vision_attention
from qie.speed.cuda_graphs import gpu_weights, warm_up_and_record

log = logging.getLogger(__name__)

MAX_SHAPES = 4  # patch counts whose graphs are kept (least recently used dropped)


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    hidden: torch.Tensor  # the input it reads: a buffer of its own, or the previous block's `out`
    out: torch.Tensor  # its output, in the graphs' memory pool


class VisionGraphs:
    """The CUDA graphs of one vision tower's blocks, and the forward `install` gives each block."""

    def __init__(
        self, tower: nn.Module, *, record: Callable[..., tuple[Any, torch.Tensor]] = warm_up_and_record
    ) -> None:
        self.tower = tower
        self.blocks: list[nn.Module] = list(tower.blocks)
        self.graphs: OrderedDict[Hashable, dict[int, _Graph]] = OrderedDict()  # shape key -> block index -> graph
        self.inputs: dict[Hashable, dict[str, torch.Tensor]] = {}  # shape key -> shared input buffers
        self.weights: tuple[int, ...] | None = None
        self.pool: Any = None
        self.disabled: str | None = None
        self.replays = 0  # block calls served by a graph so far (tests, benchmarks)
        self._record = record
        self._copied: dict[str, torch.Tensor] = {}  # the call tensors last copied into each shared buffer
        self._weights_ok = False  # the tower's weights were checked at the pass's first block

    def block_forward(self, index: int) -> Callable[..., torch.Tensor]:
        """The forward `install` sets on block `index`."""
        block = self.blocks[index]

        def forward(hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            if self.replayable(block, index, hidden_states, cu_seqlens, kwargs):
                try:
                    return self.replay(index, hidden_states, cu_seqlens, kwargs)
                except Exception as exc:  # a build whose blocks cannot be captured: eager from now on, said once
                    self.disabled = f"{type(exc).__name__}: {exc}"
                    self.clear()
                    log.warning("vision tower: CUDA graphs off (%s); running eager", self.disabled)
            return type(block).forward(block, hidden_states, cu_seqlens=cu_seqlens, **kwargs)

        return forward

    def replayable(
        self, block: nn.Module, index: int, hidden: torch.Tensor, cu_seqlens: torch.Tensor, kwargs: dict
    ) -> bool:
        """Whether a graph can serve this call (see the module doc); the weights are checked at block 0."""
        if self.disabled or not hidden.is_cuda or not torch.is_inference_mode_enabled():
            return False
        if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
            return False
        if not isinstance(getattr(block, "attn", None), vision_attention.MaskedVisionAttention):
            return False  # the stock attention reads window lengths back to the host
        embeddings = kwargs.get("position_embeddings")
        if not (isinstance(embeddings, tuple) and len(embeddings) == 2 and isinstance(cu_seqlens, torch.Tensor)):
            return False
        if any(value is not None and key not in ("position_embeddings", "max_seqlen") for key, value in kwargs.items()):
            return False
        if block._forward_hooks or block._forward_pre_hooks:
            return False  # something reads or changes the block's output
        if index == 0:
            weights = gpu_weights(self.tower)
            self._weights_ok = weights is not None
            if weights is not None and weights != self.weights:  # moved or replaced since the graphs were recorded
                self.clear()
                self.weights = weights
        return self._weights_ok

    def replay(self, index: int, hidden: torch.Tensor, cu_seqlens: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Block `index` on `hidden` from its graph for these shapes (recorded now if new)."""
        cos, sin = kwargs["position_embeddings"]
        shape = (tuple(hidden.shape), hidden.dtype, tuple(cos.shape), cos.dtype)
        inputs = self.inputs.setdefault(shape, {"cos": torch.empty_like(cos), "sin": torch.empty_like(sin)})
        cu_name = f"cu{cu_seqlens.numel()}"
        if cu_name not in inputs:
            inputs[cu_name] = torch.empty_like(cu_seqlens)
        self._copy(inputs, "cos", cos)
        self._copy(inputs, "sin", sin)
        self._copy(inputs, cu_name, cu_seqlens)
        graphs = self.graphs.setdefault(shape, {})
        self.graphs.move_to_end(shape)
        key = (index, cu_name)
        graph = graphs.get(key)
        if graph is None:
            graph = graphs[key] = self._add(index, hidden, inputs, cu_name, kwargs.get("max_seqlen"))
            while len(self.graphs) > MAX_SHAPES:
                dropped, _ = self.graphs.popitem(last=False)
                self.inputs.pop(dropped, None)
        elif hidden is not graph.hidden:
            graph.hidden.copy_(hidden)
        graph.graph.replay()
        self.replays += 1
        last = index == len(self.blocks) - 1
        return graph.out.clone() if last else graph.out  # the next block's graph reads `out` in place

    def _copy(self, inputs: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
        """Copy `value` into the shared buffer `name` unless this pass already did (the same tensor object)."""
        if self._copied.get(name) is not value:
            inputs[name].copy_(value)
            self._copied[name] = value

    def _add(self, index: int, hidden: torch.Tensor, inputs: dict, cu_name: str, max_seqlen: Any) -> _Graph:
        """Record block `index`'s graph; it reads `hidden` in place when that is the previous block's output."""
        previous = [g.out for graphs in self.graphs.values() for g in graphs.values()]
        source = hidden if any(hidden is out for out in previous) else hidden.clone()
        block = self.blocks[index]
        extra = {"max_seqlen": max_seqlen} if max_seqlen is not None else {}

        def run() -> torch.Tensor:
            vision_attention.forget_masks()  # each graph builds its own mask from its `cu_seqlens` buffer
            out = type(block).forward(
                block,
                source,
                cu_seqlens=inputs[cu_name],
                position_embeddings=(inputs["cos"], inputs["sin"]),
                **extra,
            )
            vision_attention.forget_masks()  # no mask of the graphs' pool stays in the eager calls' cache
            return out

        if self.pool is None and hidden.is_cuda:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.device(hidden.device) if hidden.is_cuda else contextlib.nullcontext():
            graph, out = self._record(run, self.pool)
        if index == 0:
            log.info("vision tower: recording the blocks' CUDA graphs for %d patches", hidden.shape[0])
        return _Graph(graph, source, out)

    def clear(self) -> None:
        """Drop every graph and buffer (their pool is freed once the last graph goes)."""
        self.graphs.clear()
        self.inputs.clear()
        self._copied.clear()
        self.pool = None


def _tower(text_encoder: nn.Module) -> nn.Module | None:
    """The vision tower of a Qwen2.5-VL-style text encoder: the module holding `blocks` and `merger`."""
    return next(
        (m for m in text_encoder.modules() if hasattr(m, "blocks") and hasattr(m, "merger") and len(m.blocks)),
        None,
    )


def install(text_encoder: nn.Module) -> int:
    """Give every block of `text_encoder`'s vision tower the graph-replaying forward; how many changed."""
    tower = _tower(text_encoder)
    if tower is None or hasattr(tower, "_qie_vision_graphs"):
        return 0
    tower._qie_vision_graphs = graphs = VisionGraphs(tower)
    for index, block in enumerate(graphs.blocks):
        block.forward = graphs.block_forward(index)
    log.info("vision tower: %d blocks replay CUDA graphs", len(graphs.blocks))
    return len(graphs.blocks)


def graphs_of(text_encoder: nn.Module) -> VisionGraphs | None:
    """The `VisionGraphs` `install` gave `text_encoder`'s vision tower, if any."""
    tower = _tower(text_encoder)
    return getattr(tower, "_qie_vision_graphs", None) if tower is not None else None


def uninstall(text_encoder: nn.Module) -> None:
    """Give the vision blocks their class's forward back and free their graphs."""
    tower = _tower(text_encoder)
    graphs = tower.__dict__.pop("_qie_vision_graphs", None) if tower is not None else None
    if graphs is None:
        return
    for block in graphs.blocks:
        block.__dict__.pop("forward", None)
    graphs.clear()
