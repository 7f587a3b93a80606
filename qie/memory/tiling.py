"""Tiled VAE encode and decode, blended with Hann (raised-cosine) windows.

The Qwen-Image VAE runs on the whole image at once; its activations grow with the image area and
dominate peak memory at large sizes on small GPUs. Here the image (or latent) is cut into
overlapping tiles, each tile goes through the VAE's own per-image encode/decode
(`vae._encode` / `vae._decode`, which handle the causal time axis), and the tiles are summed with
per-pixel weights that divide out:

    out(p) = sum_k w_k(p) * tile_k(p) / sum_k w_k(p)

Each tile's weight is 1 in its middle and falls off along a half Hann window over the band it
shares with its neighbour, so two neighbours' weights are complementary (sin² + cos² = 1) and
each tile's edge pixels, where zero padding makes the VAE least accurate, count least. Image
borders get no taper. diffusers' built-in `vae.enable_tiling()` blends linearly over a fixed
stride; this module replaces it (it is switched off while a tiled call runs).

Example:
    >>> from qie.memory.tiling import tiled_decode
    >>> image = tiled_decode(pipe.vae, latents, tile=512, overlap=32)  # doctest: +SKIP
    >>> image.shape  # (B, 3, T, 8*h, 8*w), like vae.decode(latents).sample   # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from diffusers.utils.accelerate_utils import apply_forward_hook

from qie.errors import InvalidRequestError
from qie.memory.tiles import DEFAULT_OVERLAP, WINDOWS, Tiling, tile_spans


def axis_weights(spans: list[tuple[int, int]], scale: int = 1, window: str = "hann") -> list[torch.Tensor]:
    """1-D weights of each span (in units of `spans` x `scale`), tapered over each shared band.

    With "hann" the taper over a band of n pixels is sin²(π/2 · (i + ½)/n): it never reaches 0 and
    the next tile's taper is its mirror image, so the two add up to 1. With "flat" every weight
    is 1 (overlaps are plain averages: a visible step at each band's edge).
    """
    if window not in WINDOWS:
        raise InvalidRequestError("window", window, f"use one of {WINDOWS}")
    out = []
    for k, (start, end) in enumerate(spans):
        w = torch.ones((end - start) * scale, dtype=torch.float64)
        if window == "hann":
            if k > 0:
                rise = _hann_rise((spans[k - 1][1] - start) * scale)
                w[: len(rise)] *= rise
            if k < len(spans) - 1:
                fall = _hann_rise((end - spans[k + 1][0]) * scale).flip(0)
                w[len(w) - len(fall) :] *= fall
        out.append(w)
    return out


def _hann_rise(n: int) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    return torch.sin(math.pi / 2 * (i + 0.5) / n) ** 2


def _blend(
    source: torch.Tensor,
    run: Callable[[torch.Tensor], torch.Tensor],
    rows: list[tuple[int, int]],
    cols: list[tuple[int, int]],
    src_scale: int,
    out_scale: int,
    window: str,
) -> torch.Tensor:
    """Run `run` on the tiles `rows` x `cols` (latent units) of `source` and blend the results.

    A span (a, b) is `source[..., a*src_scale : b*src_scale]` and lands at `a*out_scale :
    b*out_scale` of the output; weights are built at the output's resolution.
    """
    row_w, col_w = axis_weights(rows, out_scale, window), axis_weights(cols, out_scale, window)
    out = weight_sum = None
    for (y0, y1), wy in zip(rows, row_w, strict=True):
        for (x0, x1), wx in zip(cols, col_w, strict=True):
            result = run(source[..., y0 * src_scale : y1 * src_scale, x0 * src_scale : x1 * src_scale])
            if out is None:
                shape = (*result.shape[:-2], rows[-1][1] * out_scale, cols[-1][1] * out_scale)
                out = torch.zeros(shape, dtype=torch.float32, device=result.device)
                weight_sum = torch.zeros(shape[-2:], dtype=torch.float32, device=result.device)
            w = (wy[:, None] * wx[None, :]).to(device=result.device, dtype=torch.float32)
            region = (..., slice(y0 * out_scale, y1 * out_scale), slice(x0 * out_scale, x1 * out_scale))
            out[region] += result.float() * w
            weight_sum[region[1:]] += w
    return (out / weight_sum).to(result.dtype)


@contextmanager
def _builtin_tiling_off(vae) -> Iterator[None]:
    # vae._encode/_decode would tile again (linearly) when diffusers' own tiling is enabled.
    saved = getattr(vae, "use_tiling", False)
    vae.use_tiling = False
    try:
        yield
    finally:
        vae.use_tiling = saved


def _latent_spans(vae, height: int, width: int, tile: int, overlap: int):
    """Tile spans over a latent grid of `height` x `width` for a pixel `tile`/`overlap`."""
    tile_l, overlap_l = Tiling(tile, overlap).in_latents(vae.spatial_compression_ratio)
    return tile_spans(height, tile_l, overlap_l), tile_spans(width, tile_l, overlap_l)


@apply_forward_hook  # under diffusers/accelerate offload hooks, moves the VAE to its device first
def tiled_decode(vae, z: torch.Tensor, tile: int, overlap: int = DEFAULT_OVERLAP, window: str = "hann") -> torch.Tensor:
    """Decode latents `z` (B, C, T, h, w) in tiles of `tile` x `tile` output pixels.

    Returns what `vae.decode(z).sample` returns: (B, 3, T, 8h, 8w) in [-1, 1]. `overlap` is in
    output pixels (a multiple of the VAE scale, 8). Works on any `AutoencoderKLQwenImage`,
    full size included.

    Example:
        >>> pixels = tiled_decode(pipe.vae, latents, tile=512)  # doctest: +SKIP
    """
    scale = vae.spatial_compression_ratio
    rows, cols = _latent_spans(vae, z.shape[-2], z.shape[-1], tile, overlap)
    with _builtin_tiling_off(vae):
        return _blend(z, lambda t: vae._decode(t, return_dict=False)[0], rows, cols, 1, scale, window)


@apply_forward_hook
def tiled_encode(vae, x: torch.Tensor, tile: int, overlap: int = DEFAULT_OVERLAP, window: str = "hann") -> torch.Tensor:
    """Encode pixels `x` (B, 3, T, H, W) in tiles of `tile` x `tile` pixels.

    Returns what `vae._encode(x)` returns: the latent distribution's moments (B, 2*z_dim, T, H/8,
    W/8), mean first; the sides of `x` must be multiples of the VAE scale (8).

    Example:
        >>> moments = tiled_encode(pipe.vae, pixels, tile=512)  # doctest: +SKIP
        >>> latents = moments[:, : pipe.vae.config.z_dim]       # the mode, as "argmax" sampling takes  # doctest: +SKIP
    """
    scale = vae.spatial_compression_ratio
    if x.shape[-2] % scale or x.shape[-1] % scale:
        raise InvalidRequestError("image size", tuple(x.shape[-2:]), f"give sides that are multiples of {scale}")
    rows, cols = _latent_spans(vae, x.shape[-2] // scale, x.shape[-1] // scale, tile, overlap)
    with _builtin_tiling_off(vae):
        return _blend(x, vae._encode, rows, cols, scale, 1, window)
