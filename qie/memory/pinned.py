"""Page-locked host memory in large blocks, handed out in pieces of exactly the size asked for.

`torch.empty(..., pin_memory=True)` and `Tensor.pin_memory()` go through PyTorch's caching host
allocator, which rounds every request up to the next power of two: a 0.32 GiB streamed transformer
block holds 0.5 GiB of pinned memory, a 68 MB text-encoder weight 128 MiB, the 1.02 GiB token
embedding 2 GiB. On an H200 the `stream` plan's process peaked at 43.9 GiB of host RAM at a 10 GiB
budget with ~24 GiB of weights kept on the host (`benchmarks/bench-h200-d.json`), which that
rounding accounts for.

`PinnedArena` asks the same allocator for blocks of `ARENA_BYTES` (a power of two, so nothing is
rounded away) and hands out aligned pieces of them as tensor views, each in the first block whose
rest holds it; a request larger than a block gets a block of its own (rounded) whose rest serves
later requests. `pin_parameters` moves a module's weights largest first, so the rests fill up:
the streamed fp8 text encoder (8.74 GiB, two 1.02 GiB tables) takes 9 GiB of blocks instead of the
11 GiB that filling blocks in parameter order took (`benchmarks/bench-h200-e.json`). Views of a
pinned block are pinned, so copies from them stay asynchronous. Memory goes back when every
piece of a block is gone and the arena with it.

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
    """First-fit allocator over pinned host blocks (`pin=False`: plain host memory, for CPU-only runs).

    `reserved_bytes` is what the blocks hold, `used_bytes` what the pieces hold; the difference is
    the blocks' unused rests (a request that fits no open block's rest starts a new block).
    """

    def __init__(self, pin: bool = True, arena_bytes: int = ARENA_BYTES) -> None:
        self.pin = pin
        self.arena_bytes = arena_bytes
        self.reserved_bytes = 0
        self.used_bytes = 0
        self._open: list[list] = []  # [block, offset] of blocks with room left

    def empty(self, nbytes: int) -> torch.Tensor:
        """An uninitialized uint8 piece of `nbytes` (a view of a pinned block)."""
        if nbytes <= 0:
            return torch.empty(0, dtype=torch.uint8)
        spot = next((s for s in self._open if s[1] + nbytes <= s[0].numel()), None)
        if spot is None:
            size = max(self.arena_bytes, _next_pow2(nbytes))
            spot = [torch.empty(size, dtype=torch.uint8, pin_memory=self.pin), 0]
            self._open.append(spot)
            self.reserved_bytes += size
        block, offset = spot
        piece = block.narrow(0, offset, nbytes)
        spot[1] = -(-(offset + nbytes) // ALIGN) * ALIGN
        if block.numel() - spot[1] < ALIGN:  # full: the arena lets go of it (its pieces keep it alive)
            self._open.remove(spot)
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
        for p in sorted(module.parameters(), key=lambda p: p.numel() * p.element_size(), reverse=True):
            p.data = self.copy(p.data)  # largest first: the small ones fill the blocks' rests
            moved += p.numel() * p.element_size()
        return moved
