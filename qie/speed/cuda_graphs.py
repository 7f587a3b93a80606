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
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

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
    stack: list[tuple[str, nn.Module]] = [("", model)]
    seen: set[int] = set()
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        state = module.__dict__
        if "_hf_hook" in state:
            return f"{name or type(module).__name__}: accelerate hook"
        hooks = getattr(state.get("_diffusers_hook"), "hooks", None)
        if hooks:
            return f"{name or type(module).__name__}: diffusers hooks {', '.join(hooks)}"
        for param_name, param in state["_parameters"].items():
            if param is None:
                continue
            if param.device.type != device_type:
                return f"{f'{name}.' if name else ''}{param_name} on {param.device}"
            if _is_subclass(type(param)):
                addresses.extend(_addresses(param))
            else:
                addresses.append(param.data_ptr())
        children = state["_modules"]
        if children:
            prefix = f"{name}." if name else ""
            stack.extend((prefix + key, child) for key, child in reversed(children.items()) if child is not None)
    return tuple(addresses)


@functools.cache
def _is_subclass(kind: type) -> bool:
    """Whether tensors of type `kind` wrap other tensors (torchao's fp8 weights): asked once per type."""
    return hasattr(kind, "__tensor_flatten__")


def _addresses(tensor: torch.Tensor) -> list[int]:
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return [a for name in names for a in _addresses(getattr(tensor, name))]
    return [tensor.data_ptr()]


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
