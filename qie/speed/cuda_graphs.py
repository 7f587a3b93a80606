"""What the CUDA-graph replays of qie share: the weights a graph may read, and the recording itself.

A CUDA graph holds the addresses of every tensor its kernels read. It may replay only while the
weights it was recorded with are where they were: `gpu_weights` gives their addresses (None when a
weight is off the GPU or a hook may move it), and a replayer drops its graphs when they change.

Example:
    >>> gpu_weights(torch.nn.Linear(2, 2)) is None  # on the CPU: nothing to replay on a GPU
    True
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")


def gpu_weights(model: nn.Module, device_type: str = "cuda") -> tuple[int, ...] | None:
    """The addresses of `model`'s weights when every one sits on a `device_type` device with no hook to move
    it (what a graph may read), else None (`weight_addresses` says why). One walk over the modules."""
    addresses = weight_addresses(model, device_type)
    return addresses if isinstance(addresses, tuple) else None


def weight_addresses(model: nn.Module, device_type: str = "cuda") -> tuple[int, ...] | str:
    """`gpu_weights`, or instead of None what stops a graph: the first module with an accelerate hook or a
    diffusers hook (offloading, step caches; the empty hook registry diffusers leaves behind does not
    count) or a weight on another device.

    A tensor subclass (torchao's fp8 weights) counts with the addresses of the tensors it holds.

    Example:
        >>> weight_addresses(torch.nn.Linear(2, 2))
        'weight on cpu'
        >>> len(weight_addresses(torch.nn.Linear(2, 2), device_type="cpu"))  # weight and bias
        2
    """
    addresses: list[int] = []
    # A walk over the modules' own dictionaries: it runs before every edit that may replay, and
    # `named_modules` + `named_parameters` + `hasattr` (which goes through `Module.__getattr__` when
    # the attribute is missing) took 3-4x as long for the transformer's ~2,300 modules (18 against
    # 5 ms for the bf16 tree on a CPU; 0.075 s of the fast edit's host time under cProfile on an H200).
    # Names are built only for the answer on a failure (`_name_of`).
    stack: list[nn.Module | None] = [model]
    seen: set[int] = set()
    cuda = device_type == "cuda"  # `is_cuda` is a flag; `.device` builds an object per weight
    while stack:
        module = stack.pop()
        if module is None or id(module) in seen:
            continue
        seen.add(id(module))
        state = module.__dict__
        if "_hf_hook" in state:
            return f"{_name_of(model, module)}: accelerate hook"
        hooks = getattr(state.get("_diffusers_hook"), "hooks", None)
        if hooks:
            return f"{_name_of(model, module)}: diffusers hooks {', '.join(hooks)}"
        for param_name, param in state["_parameters"].items():
            if param is None:
                continue
            for tensor in _leaves(param) if _is_subclass(type(param)) else (param,):
                if not (tensor.is_cuda if cuda else tensor.device.type == device_type):
                    return f"{_name_of(model, module, param_name)} on {tensor.device}"
                addresses.append(tensor.data_ptr())
        children = state["_modules"]
        if children:
            stack.extend(reversed(children.values()))  # in `parameters()` order; a None child is skipped
    return tuple(addresses)


def _name_of(model: nn.Module, module: nn.Module, param: str | None = None) -> str:
    """`module`'s dotted name in `model` with `.param` if given (a weight of `model` itself: `param`;
    `model` itself: its class name)."""
    name = next((n for n, m in model.named_modules(remove_duplicate=False) if m is module), "")
    if param:
        return f"{name}.{param}" if name else param
    return name or type(module).__name__


@functools.cache
def _is_subclass(kind: type) -> bool:
    """Whether tensors of type `kind` wrap other tensors (torchao's fp8 weights): asked once per type."""
    return hasattr(kind, "__tensor_flatten__")


def _leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a wrapper subclass holds, read from its attributes (recursively).

    `__tensor_flatten__` and attribute reads (`.device`) run the subclass's Python code, torchao's
    `__torch_function__` among it: the fp8 transformer's walk took 11.3 ms that way, 7.4 ms this way, on a CPU.
    """
    out: list[torch.Tensor] = []
    for value in tensor.__dict__.values():
        if isinstance(value, torch.Tensor):
            out.extend(_leaves(value) if _is_subclass(type(value)) else (value,))
    return out


def record(fn: Callable[[], T], pool: Any, *, error_mode: str = "global") -> tuple[torch.cuda.CUDAGraph, T]:
    """Record `fn()` as a CUDA graph in the memory `pool` (None: a pool of its own; another graph's
    `graph.pool()` shares that one); the graph and `fn`'s output, whose buffers the graph's replays
    overwrite. Recording runs no kernel.

    `error_mode="thread_local"` lets other threads use the GPU meanwhile (a server's threads)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode=error_mode):
        out = fn()
    return graph, out


def warm_up_and_record(fn: Callable[[], T], pool: Any) -> tuple[torch.cuda.CUDAGraph, T]:
    """`fn()` once on a side stream (cuBLAS workspaces and lazy initializations stay out of the graph),
    then `record(fn, pool)`."""
    device = torch.cuda.current_device()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    return record(fn, pool)
