"""Masked (region) edits: outside the region the output keeps the original's pixels exactly.

A region is a mask (white = edit, values >= 128; the size of the last input image) or a box
(x0, y0, x1, y1 in that image's pixels, x1/y1 exclusive). After decoding, the edit is composited
onto the original: outside the region alpha is 0 and the original's pixels are copied unchanged;
inside, alpha rises from the region's edge to 1 over `feather` pixels (a smoothstep of the
distance to the outside, measured inward), so a local edit such as "add a price tag bottom
right" blends in at its border but never touches the product next to it.

Example:
    >>> from PIL import Image
    >>> original, edited = Image.new("RGB", (64, 64), "white"), Image.new("RGB", (64, 64), "red")
    >>> mask = box_mask((64, 64), (32, 32, 64, 64))
    >>> out = composite(original, edited, mask, feather=8)
    >>> out.getpixel((0, 0)), out.getpixel((63, 63))
    ((255, 255, 255), (255, 0, 0))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from qie.core.images import ImageInput, load_image
from qie.errors import InvalidRequestError

DEFAULT_FEATHER = 16  # pixels of the output
MAX_FEATHER = 256
THRESHOLD = 128  # mask values at or above this are "edit"


def check_region(
    mask: ImageInput | None, box: Any, input_size: tuple[int, int]
) -> tuple[Image.Image | None, tuple[int, int, int, int] | None]:
    """Validate a request's `mask` / `box` against the last input image's (width, height).

    Returns the mask as an 8-bit grayscale image (or None) and the box as a tuple (or None).
    """
    if mask is not None and box is not None:
        raise InvalidRequestError("box", box, "give either mask or box, not both")
    width, height = input_size
    if box is not None:
        return None, _check_box(box, width, height)
    if mask is None:
        return None, None
    image = mask if isinstance(mask, Image.Image) and mask.mode == "L" else load_image(mask, name="mask")
    image = image.convert("L")
    if image.size != input_size:
        raise InvalidRequestError(
            "mask",
            f"{image.width}x{image.height}",
            f"give a mask the size of the last input image ({width}x{height}), white where the edit goes",
        )
    if np.asarray(image).max() < THRESHOLD:
        raise InvalidRequestError(
            "mask", "<no white pixels>", f"paint the region to edit white (values >= {THRESHOLD}); black is kept"
        )
    return image, None


def _check_box(box: Any, width: int, height: int) -> tuple[int, int, int, int]:
    fix = (
        f"give (x0, y0, x1, y1) as whole pixels of the last input image with 0 <= x0 < x1 <= {width} "
        f"and 0 <= y0 < y1 <= {height}"
    )
    if not isinstance(box, Sequence) or isinstance(box, str) or len(box) != 4:
        raise InvalidRequestError("box", box, fix)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in box):
        raise InvalidRequestError("box", box, fix)
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise InvalidRequestError("box", tuple(box), fix)
    return x0, y0, x1, y1


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """A binary mask of `size` (width, height), white inside `box` (x1/y1 exclusive)."""
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    return Image.fromarray(mask, mode="L")


def region_mask(
    size: tuple[int, int],
    source_size: tuple[int, int],
    *,
    mask: Image.Image | None = None,
    box: tuple[int, int, int, int] | None = None,
) -> Image.Image:
    """The region (given on an image of `source_size`) as a binary mask of `size`.

    A box is scaled outward (its edges rounded away from its centre), so the region never shrinks.
    """
    sx, sy = size[0] / source_size[0], size[1] / source_size[1]
    if box is not None:
        x0, y0, x1, y1 = box
        scaled = (math.floor(x0 * sx), math.floor(y0 * sy), math.ceil(x1 * sx), math.ceil(y1 * sy))
        return box_mask(size, scaled)
    if mask is None:
        raise ValueError("region_mask needs a mask or a box")
    resized = mask if mask.size == size else mask.resize(size, Image.Resampling.BILINEAR)
    return Image.fromarray(np.where(np.asarray(resized) >= THRESHOLD, 255, 0).astype(np.uint8), mode="L")


def feather_alpha(inside: np.ndarray, feather: int) -> np.ndarray:
    """Blend weights for a boolean region: 0 outside, rising to 1 at `feather` pixels inward.

    The distance is counted by successive erosions, alternating 8- and 4-neighbourhoods (an
    octagonal approximation of the Euclidean distance). Pixels beyond the image border count as
    inside, so a region that touches the border is not faded there. The ramp is a smoothstep,
    so it has no kink where it meets 0 and 1.
    """
    inside = inside.astype(bool)
    if feather == 0:
        return inside.astype(np.float64)
    survived = np.zeros(inside.shape, dtype=np.float64)
    current = inside
    for k in range(feather):
        current = _erode(current, diagonal=k % 2 == 0)
        if not current.any():
            break
        survived += current
    ramp = np.where(inside, (survived + 1) / (feather + 1), 0.0)
    return ramp * ramp * (3 - 2 * ramp)


def _erode(region: np.ndarray, *, diagonal: bool) -> np.ndarray:
    padded = np.pad(region, 1, constant_values=True)
    h, w = region.shape
    out = region.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if (dy or dx) and (diagonal or not (dy and dx)):
                out &= padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
    return out


def composite(
    original: Image.Image, edited: Image.Image, mask: Image.Image, feather: int = DEFAULT_FEATHER
) -> Image.Image:
    """`edited` inside `mask` (white >= 128), `original` outside, blended over `feather` px inside the edge.

    Pixels outside the mask are the original's exactly; pixels at least `feather` px inside are
    the edit's exactly. All three images must have the same size.

    Example:
        >>> from PIL import Image
        >>> a, b = Image.new("RGB", (8, 8), "black"), Image.new("RGB", (8, 8), "white")
        >>> composite(a, b, box_mask((8, 8), (0, 0, 4, 8)), feather=0).getpixel((6, 0))
        (0, 0, 0)
    """
    if not original.size == edited.size == mask.size:
        raise ValueError(f"sizes differ: original {original.size}, edited {edited.size}, mask {mask.size}")
    alpha = feather_alpha(np.asarray(mask.convert("L")) >= THRESHOLD, feather)[..., None]
    a = np.asarray(original.convert("RGB"))
    b = np.asarray(edited.convert("RGB"))
    blended = np.rint(a * (1.0 - alpha) + b * alpha).astype(np.uint8)
    out = np.where(alpha == 0, a, np.where(alpha == 1, b, blended))
    return Image.fromarray(out, mode="RGB")


def keep_outside_region(request, image: Image.Image) -> Image.Image:
    """The editor's step: composite `image` (the decoded edit) with the request's last input image.

    The original is resized to `image`'s size first (a no-op with `resize_to_input`, where the
    outside pixels are then the input file's own).
    """
    original = request.images[-1]
    if original.size != image.size:
        original = original.resize(image.size, Image.Resampling.LANCZOS)
    mask = region_mask(image.size, request.input_size, mask=request.mask, box=request.box)
    return composite(original, image, mask, request.mask_feather)
