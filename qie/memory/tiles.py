"""Tile geometry for the tiled VAE (no torch: `qie.core.request` validates with it).

Example:
    >>> Tiling(512).in_latents(8)
    (64, 4)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qie.errors import InvalidRequestError

DEFAULT_OVERLAP = 32  # px: 4 latent pixels at the VAE's 8x scale
MIN_TILE, MAX_TILE = 64, 4096
WINDOWS = ("hann", "flat")  # "flat" (plain averaging of overlaps) exists to compare against


@dataclass(frozen=True)
class Tiling:
    """Tile side and overlap in output pixels, validated on creation.

    The side is a multiple of 32 from 64 to 4096 (as output sides are), the overlap a multiple of
    the VAE scale (8) from 0 to half the side.

    Example:
        >>> Tiling(512).overlap
        32
    """

    size: int
    overlap: int = DEFAULT_OVERLAP

    def __post_init__(self) -> None:
        if not _is_int(self.size) or self.size % 32 or not MIN_TILE <= self.size <= MAX_TILE:
            raise InvalidRequestError(
                "tile_size",
                self.size,
                f"give a multiple of 32 from {MIN_TILE} to {MAX_TILE} pixels, or None for no tiling",
            )
        if not _is_int(self.overlap) or self.overlap % 8 or not 0 <= self.overlap <= self.size // 2:
            raise InvalidRequestError(
                "tile_overlap", self.overlap, f"give a multiple of 8 from 0 to half the tile ({self.size // 2}) pixels"
            )

    def in_latents(self, scale: int) -> tuple[int, int]:
        """(tile, overlap) in latent pixels of a VAE that downsamples by `scale`."""
        for name, value in (("tile_size", self.size), ("tile_overlap", self.overlap)):
            if value % scale:
                raise InvalidRequestError(name, value, f"give a multiple of the VAE's scale ({scale} px)")
        return self.size // scale, self.overlap // scale


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Start/end of the tiles that cover `length` with at least `overlap` shared between neighbours.

    The tiles are spread evenly, so every shared band is about as wide as the others.

    Example:
        >>> tile_spans(100, 40, 8)
        [(0, 40), (30, 70), (60, 100)]
    """
    if length <= tile:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile - overlap))  # >= 2 here
    starts = [round(i * (length - tile) / (count - 1)) for i in range(count)]
    return [(s, s + tile) for s in starts]
