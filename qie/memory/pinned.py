"""Page-locked host memory in large blocks, handed out in pieces of exactly the size asked for.

`torch.empty(..., pin_memory=True)` and `Tensor.pin_memory()` go through PyTorch's caching host
allocator, which rounds every request up to the next power of two: a 0.32 GiB streamed transformer
block holds 0.5 GiB of pinned memory, a 68 MB text-encoder weight 128 MiB, the 1.02 GiB token
embedding 2 GiB. On an H200 the `stream` plan's process peaked at 43.9 GiB of host RAM at a 10 GiB
budget with ~24 GiB of weights kept on the host (`benchmarks/bench-h200-d.json`), which that
rounding accounts for.

`PinnedArena` asks the same allocator for blocks of `ARENA_BYTES` (a power of two, so nothing is
rounded away) and hands out consecutive, aligned pieces of them as tensor views; a request larger
than a block gets a block of its own (rounded) whose rest serves the next requests. Views of a
pinned block are pinned, so copies from them stay asynchronous. Memory goes back when every
piece of a block is gone.

Example:
    >>> arena = PinnedArena()                                   # doctest: +SKIP
    >>> host = arena.copy(layer.weight.data)                    # doctest: +SKIP
    >>> host.is_pinned(), arena.used_bytes / arena.reserved_bytes  # doctest: +SKIP
    (True, 0.99)
"""

from __future__ import annotations

import torch

ARENA_BYTES = 1 << 30  # 1 GiB: three streamed fp8 blocks of the 20 B transformer, 95% used
ALIGN = 512  # bytes between pieces: any dtype's alignment, and the copy engine's preferred one


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class PinnedArena:
    """Bump allocator over pinned host blocks (`pin=False`: plain host memory, for CPU-only runs).

    `reserved_bytes` is what the blocks hold, `used_bytes` what the pieces hold; the difference is
    the unused tail of each block (a request that does not fit the current block starts a new one).
    """

    def __init__(self, pin: bool = True, arena_bytes: int = ARENA_BYTES) -> None:
        self.pin = pin
        self.arena_bytes = arena_bytes
        self.reserved_bytes = 0
        self.used_bytes = 0
        self._block: torch.Tensor | None = None
        self._offset = 0

    def empty(self, nbytes: int) -> torch.Tensor:
        """An uninitialized uint8 piece of `nbytes` (a view of a pinned block)."""
        if nbytes <= 0:
            return torch.empty(0, dtype=torch.uint8)
        if self._block is None or self._offset + nbytes > self._block.numel():
            size = max(self.arena_bytes, _next_pow2(nbytes))
            self._block = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
            self._offset = 0
            self.reserved_bytes += size
        piece = self._block.narrow(0, self._offset, nbytes)
        self._offset = -(-(self._offset + nbytes) // ALIGN) * ALIGN
        self.used_bytes += nbytes
        return piece

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of `tensor` in this arena, same dtype and shape (contiguous)."""
        nbytes = tensor.numel() * tensor.element_size()
        out = self.empty(nbytes).view(tensor.dtype).view(tensor.shape)
        out.copy_(tensor.detach())
        return out

    def pin_parameters(self, module: torch.nn.Module) -> int:
        """Move every parameter of `module` into this arena, in place; returns the bytes moved.

        For code that pins weights itself afterwards with `Tensor.pin_memory()` (diffusers' group
        offloading): that call returns an already pinned tensor as it is, so no rounded copy is made.
        """
        moved = 0
        for p in module.parameters():
            p.data = self.copy(p.data)
            moved += p.numel() * p.element_size()
        return moved
