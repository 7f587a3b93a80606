"""The text encoder's vision blocks replayed as one CUDA graph per image grid.

With its windowed attention as one masked call (`qie.speed.vision_attention`) the vision tower never
waits for the GPU, but its 32 blocks still launch ~20 small kernels each for a few hundred patches:
launching them takes the host longer than the GPU takes to run them. `install` records the blocks'
chain as one CUDA graph per image grid (`grid_thw`: the patch layout, which also fixes the window
boundaries and the rotary position embeddings the blocks receive): the first tower call with a grid
runs eagerly and records the graph at its end; later calls copy in the first block's input, replay
the graph at the first block, and each block returns its output from the graph's buffers (the last
one a copy). The graph runs the same kernels on the same inputs as the eager blocks (GPU test: equal
bit for bit), and its memory pool holds one block's temporaries plus the 32 outputs.

Only calls a graph can replay take this path: on CUDA, under `torch.inference_mode` (as edits run),
the masked attention installed in every block, no keyword arguments with values other than the
position embeddings and `max_seqlen`, no forward hooks on a block (transformers' output-capturing
hooks count only while they capture), every weight of the tower on the GPU with no offloading hook,
blocks called in order on the previous block's output. Every other call runs the block's own forward.
Graphs are dropped when the tower's weights move (a plan change, fp8 storage), and a failed
recording turns the graphs off for good, said once.

Example:
    >>> install(pipe.text_encoder)  # doctest: +SKIP
    32
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qie.speed import vision_attention
from qie.speed.cuda_graphs import gpu_weights, warm_up_and_record

log = logging.getLogger(__name__)

MAX_GRIDS = 4  # image grids whose graphs are kept (least recently used dropped)


@dataclass
class _Chain:
    graph: Any  # torch.cuda.CUDAGraph
    hidden: torch.Tensor  # the first block's input buffer
    outs: list[torch.Tensor]  # each block's output, in the graphs' memory pool
    shapes: tuple  # the blocks' (cu_seqlens, cos) shapes at recording, checked at each replay
    inputs: list[torch.Tensor]  # the window boundaries and position embeddings it reads: kept alive with it


@dataclass
class _Pass:
    """One call of the tower: its grid key, its chain (None: run eagerly and record one), how far it got."""

    key: Hashable
    chain: _Chain | None
    calls: list[tuple[torch.Tensor, dict]] = field(default_factory=list)  # the blocks' inputs (recording pass)
    first: torch.Tensor | None = None  # the first block's input (recording pass)
    broken: bool = False  # a block ran off the graph: the rest of the pass runs eagerly


class VisionGraphs:
    """The CUDA graphs of one vision tower's block chain, and the forwards `install` gives the blocks."""

    def __init__(
        self, tower: nn.Module, *, record: Callable[..., tuple[Any, list[torch.Tensor]]] = warm_up_and_record
    ) -> None:
        self.tower = tower
        self.blocks: list[nn.Module] = list(tower.blocks)
        self.graphs: OrderedDict[Hashable, _Chain] = OrderedDict()
        self.weights: tuple[int, ...] | None = None  # the weight addresses the graphs were recorded with
        self.pool: Any = None
        self.disabled: str | None = None  # why the graphs are off for good (a recording failed)
        self.replays = 0  # tower calls served by a graph so far
        self.hooks: list[Any] = []  # the tower's pre- and post-hook handles (`install`)
        self._record = record
        self._pass: _Pass | None = None

    # -- the tower's call ------------------------------------------------------------------------------

    def start(self, hidden: torch.Tensor, grid_thw: torch.Tensor | None) -> None:
        """Called before each tower forward (a pre-hook): decide whether this call's blocks can use a graph."""
        self._pass = None
        if grid_thw is None or not self.tower_replayable(hidden):
            return
        weights = gpu_weights(self.tower)
        if weights is None:
            return
        if weights != self.weights:  # moved or replaced since the graphs were recorded
            self.clear()
            self.weights = weights
        grid = tuple(tuple(row) for row in grid_thw.tolist())  # the tower's own helpers read it back too
        key = (grid, tuple(hidden.shape), hidden.dtype)
        chain = self.graphs.get(key)
        if chain is not None:
            self.graphs.move_to_end(key)
        self._pass = _Pass(key, chain)

    def finish(self) -> None:
        """Called after each tower forward (a hook): no block call outside a tower call replays."""
        self._pass = None

    def tower_replayable(self, hidden: torch.Tensor) -> bool:
        """Whether a graph can serve this tower call (see the module doc; blocks check their own calls)."""
        if self.disabled or not hidden.is_cuda or not torch.is_inference_mode_enabled():
            return False
        if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
            return False
        masked = vision_attention.MaskedVisionAttention
        return all(isinstance(getattr(block, "attn", None), masked) for block in self.blocks)

    # -- the blocks' calls -----------------------------------------------------------------------------

    def block_forward(self, index: int) -> Callable[..., torch.Tensor]:
        """The forward `install` sets on block `index`."""
        block = self.blocks[index]

        def forward(hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            run = self._pass
            if run is not None and not run.broken and self.block_replayable(block, cu_seqlens, kwargs):
                try:
                    out = self._step(run, index, block, hidden_states, cu_seqlens, kwargs)
                    if out is not None:
                        return out
                except Exception as exc:  # a build whose blocks cannot be captured: eager from now on, said once
                    self.disabled = f"{type(exc).__name__}: {exc}"
                    self.clear()
                    log.warning("vision tower: CUDA graphs off (%s); running eager", self.disabled)
            if run is not None:
                run.broken = True
            return type(block).forward(block, hidden_states, cu_seqlens=cu_seqlens, **kwargs)

        return forward

    @staticmethod
    def block_replayable(block: nn.Module, cu_seqlens: Any, kwargs: dict) -> bool:
        """Whether a block call is one the graph records: no hooks that act, only the keyword values it takes."""
        if not _idle_hooks(block) or not isinstance(cu_seqlens, torch.Tensor):
            return False
        embeddings = kwargs.get("position_embeddings")
        if not (isinstance(embeddings, tuple) and len(embeddings) == 2):
            return False
        return all(value is None or key in ("position_embeddings", "max_seqlen") for key, value in kwargs.items())

    def _step(
        self, run: _Pass, index: int, block: nn.Module, hidden: torch.Tensor, cu_seqlens: torch.Tensor, kwargs: dict
    ) -> torch.Tensor | None:
        """Block `index` from the pass's chain, or eagerly while noting what recording needs; None: off the graph."""
        last = index == len(self.blocks) - 1
        chain = run.chain
        if chain is None:  # the grid's first call: eager, recorded at its end
            if index != len(run.calls):
                return None
            if index == 0:
                run.first = hidden.clone()
            run.calls.append((cu_seqlens, kwargs))
            out = type(block).forward(block, hidden, cu_seqlens=cu_seqlens, **kwargs)
            if last:
                self._add(run)
            return out
        if chain.shapes[index] != (tuple(cu_seqlens.shape), tuple(kwargs["position_embeddings"][0].shape)):
            return None
        if index == 0:
            chain.hidden.copy_(hidden)
            chain.graph.replay()
            self.replays += 1
        elif hidden is not chain.outs[index - 1]:
            return None  # not the previous block's output: the chain no longer applies
        return chain.outs[index].clone() if last else chain.outs[index]

    def _add(self, run: _Pass) -> None:
        """Record the chain of the pass's grid from the inputs its eager blocks received."""
        statics: dict[int, torch.Tensor] = {}  # a clone per distinct input tensor (the tower passes the same few)

        def static(tensor: Any) -> Any:
            if not isinstance(tensor, torch.Tensor):
                return tensor
            if id(tensor) not in statics:
                statics[id(tensor)] = tensor.clone()
            return statics[id(tensor)]

        calls = [
            (static(cu), {key: tuple(map(static, v)) if isinstance(v, tuple) else static(v) for key, v in kw.items()})
            for cu, kw in run.calls
        ]
        hidden = run.first
        blocks = self.blocks

        def chain() -> list[torch.Tensor]:
            vision_attention.forget_masks()  # the graph builds its masks from its own `cu_seqlens` buffers
            outs, h = [], hidden
            for block, (cu, kw) in zip(blocks, calls, strict=True):
                h = type(block).forward(block, h, cu_seqlens=cu, **kw)
                outs.append(h)
            vision_attention.forget_masks()  # no mask of the graph's pool stays in the eager calls' cache
            return outs

        if self.pool is None and hidden.is_cuda:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.device(hidden.device) if hidden.is_cuda else contextlib.nullcontext():
            graph, outs = self._record(chain, self.pool)
        shapes = tuple((tuple(cu.shape), tuple(kw["position_embeddings"][0].shape)) for cu, kw in calls)
        self.graphs[run.key] = _Chain(graph, hidden, outs, shapes, list(statics.values()))
        while len(self.graphs) > MAX_GRIDS:
            self.graphs.popitem(last=False)
        log.info("vision tower: recorded its blocks' CUDA graph for %d patches", hidden.shape[0])

    def clear(self) -> None:
        """Drop every graph (their pool is freed once the last one goes)."""
        self.graphs.clear()
        self.pool = None
        self._pass = None


def _idle_hooks(block: nn.Module) -> bool:
    """Whether `block` has no hooks, or only transformers' output-capturing ones while nothing is captured.

    transformers installs those on the vision blocks at the first call that asks for hidden states
    (e.g. the full text encoder with `output_hidden_states=True`) and leaves them; they return at once
    unless a collector is active, and then they would keep the graph's buffers, so the block runs eagerly.
    """
    if block._forward_pre_hooks:
        return False
    hooks = list(block._forward_hooks.values())
    if not hooks:
        return True
    if not all(getattr(h, "__name__", "") == "output_capturing_hook" for h in hooks):
        return False
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # another layout: assume they act
        return False
    collected = _active_collector.get()  # the outputs being captured now, by name (a model may set an empty one)
    names = [_captured_name(hook) for hook in hooks]
    return collected is None or not any(name is None or name in collected for name in names)


def _captured_name(hook: Callable) -> str | None:
    """The output an output-capturing hook collects ("hidden_states", "attentions"; its closure's `key`)."""
    try:
        return hook.__closure__[hook.__code__.co_freevars.index("key")].cell_contents
    except (AttributeError, IndexError, TypeError, ValueError):
        return None


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

    def start(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if isinstance(hidden, torch.Tensor):
            graphs.start(hidden, grid)

    graphs.hooks = [
        tower.register_forward_pre_hook(start, with_kwargs=True),
        tower.register_forward_hook(lambda *args: graphs.finish()),
    ]
    for index, block in enumerate(graphs.blocks):
        block.forward = graphs.block_forward(index)
    log.info("vision tower: %d blocks replay one CUDA graph per image grid", len(graphs.blocks))
    return len(graphs.blocks)


def graphs_of(text_encoder: nn.Module) -> VisionGraphs | None:
    """The `VisionGraphs` `install` gave `text_encoder`'s vision tower, if any."""
    tower = _tower(text_encoder)
    return getattr(tower, "_qie_vision_graphs", None) if tower is not None else None


def uninstall(text_encoder: nn.Module) -> None:
    """Give the vision blocks their class's forward back, remove the tower's hook and free the graphs."""
    tower = _tower(text_encoder)
    graphs = tower.__dict__.pop("_qie_vision_graphs", None) if tower is not None else None
    if graphs is None:
        return
    for handle in graphs.hooks:
        handle.remove()
    for block in graphs.blocks:
        block.__dict__.pop("forward", None)
    graphs.clear()
