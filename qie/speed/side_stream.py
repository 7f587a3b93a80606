"""Two independent pieces of GPU work at once: one on a side CUDA stream, one on the current stream.

An edit's two encoders do not depend on each other. The text encoder (Qwen2.5-VL) is limited by
the host, which launches ~2800 small kernels for ~20 ms of GPU work; the VAE's encode of the
input image is a few large convolutions. Launched on a side stream first, the VAE's kernels run
while the host is still busy launching the text encoder's, so the condition costs little more
than its launch. `Editor.encode` does this on the resident plans (where both encoders sit on the
GPU and memory has room for both at once).

The result of the side work is made safe for the current stream: the current stream waits for
the side stream, and the side work's tensors are recorded on the current stream, so the caching
allocator does not hand their memory to other work before the current stream is done with them.

Example:
    >>> text, condition = side_by_side(device, encode_text, encode_image)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

A = TypeVar("A")
B = TypeVar("B")

_STREAMS: dict[int, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The process's side stream for `device` (one per GPU, made on first use)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(device=index)
    return _STREAMS[index]


def side_by_side(device: torch.device, main: Callable[[], A], side: Callable[[], B]) -> tuple[A, B]:
    """`(main(), side())`, with `side` launched first on a side stream and `main` on the current stream.

    Both see the current stream's earlier work; the current stream's later work sees both. Off
    CUDA, `side()` then `main()` run one after the other.
    """
    if device.type != "cuda":
        second = side()
        return main(), second
    current = torch.cuda.current_stream(device)
    stream = side_stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        second = side()
    first = main()
    current.wait_stream(stream)
    for tensor in tensors_in(second):
        if tensor.is_cuda:
            tensor.record_stream(current)
    return first, second


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in `value`: a tensor, a list or tuple of values, or a dataclass of them.

    Example:
        >>> len(list(tensors_in((torch.zeros(1), [torch.ones(2)], "text"))))
        2
    """
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            yield from tensors_in(getattr(value, name))
