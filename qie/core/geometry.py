"""Output size rules.

By default the output keeps the input's aspect ratio at no more than ~1024² pixels, both sides a
multiple of 32 (users of the model report less zoom and pixel shift that way). Explicit sizes only
need to be multiples of 16 (the transformer works on 2x2 patches of 8x-downsampled latents); other
values are rounded down with a warning.
"""

from __future__ import annotations

import logging
import math

from qie.errors import InvalidRequestError

log = logging.getLogger(__name__)

DEFAULT_AREA = 1024 * 1024
ALIGN_DEFAULT = 32
ALIGN_EXPLICIT = 16
MIN_SIDE = 64
MAX_SIDE = 4096
MAX_AREA = 2048 * 2048


def fit_area(
    width: int, height: int, area: int = DEFAULT_AREA, multiple: int = ALIGN_DEFAULT, max_side: int | None = None
) -> tuple[int, int]:
    """The `multiple`-aligned size nearest to `width:height` aspect at ~`area` pixels.

    Sides are rounded to the nearest multiple (as diffusers does); with `max_side`, the longer side
    is scaled down to at most `max_side` first and never rounded above it.

    Example:
        >>> fit_area(4000, 3000)
        (1184, 896)
        >>> fit_area(600, 400, max_side=128)
        (128, 96)
    """
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    if max_side is not None:
        scale = min(1.0, max_side / max(w, h))
        w, h = w * scale, h * scale
    return _round(w, multiple, max_side), _round(h, multiple, max_side)


def _round(side: float, multiple: int, limit: int | None) -> int:
    out = max(multiple, round(side / multiple) * multiple)
    if limit is not None and out > limit:
        out = max(multiple, int(limit // multiple) * multiple)
    return out


def output_size(
    input_size: tuple[int, int],
    height: int | None = None,
    width: int | None = None,
    max_side: int | None = None,
    area: int = DEFAULT_AREA,
) -> tuple[int, int]:
    """Settle the output (width, height) for an input of `input_size` (width, height).

    Either both `height` and `width` are given (rounded down to multiples of 16 with a warning),
    or neither: then the input's aspect at ~`area` pixels, multiples of 32. `max_side` caps the
    longer side in both cases.
    """
    if (height is None) != (width is None):
        given, missing = ("height", "width") if width is None else ("width", "height")
        raise InvalidRequestError(given, height if width is None else width, f"give {missing} too, or neither")
    if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < MIN_SIDE):
        raise InvalidRequestError("max_side", max_side, f"give a whole number of pixels, at least {MIN_SIDE}")
    if isinstance(area, bool) or not isinstance(area, int) or not MIN_SIDE**2 <= area <= MAX_AREA:
        raise InvalidRequestError("area", area, f"give a whole number of pixels from {MIN_SIDE**2:,} to {MAX_AREA:,}")
    if height is not None and width is not None:
        w, h = _aligned("width", width), _aligned("height", height)
        if max_side is not None and max(w, h) > max_side and min(w, h) >= MIN_SIDE:
            w, h = fit_area(w, h, area=w * h, max_side=max_side)
            if min(w, h) < MIN_SIDE:  # the asked sizes were fine; max_side squeezed the short side
                _too_extreme(_aspect((width, height)), max_side, area, explicit=True)
    else:
        w, h = fit_area(*input_size, area=area, max_side=max_side)
        if min(w, h) < MIN_SIDE:
            _too_extreme(_aspect(input_size), max_side, area, explicit=False)
    _check_bounds(w, h)
    return w, h


def _aspect(size: tuple[int, int]) -> float:
    return max(size) / min(size)


def _too_extreme(aspect: float, max_side: int | None, area: int, explicit: bool) -> None:
    """Raise the error for an aspect too extreme to keep at the asked size (the short side drops below MIN_SIDE)."""
    need = math.ceil(MIN_SIDE * aspect / ALIGN_DEFAULT) * ALIGN_DEFAULT
    what = "asked width:height" if explicit else "input's aspect"
    param, value = ("max_side", max_side) if max_side is not None else ("area", area)
    fix = (
        f"the {what} ratio ({aspect:.1f}:1) is too extreme for {param}={value}: the short side would be "
        f"below the {MIN_SIDE} px minimum; "
        + (
            f"raise max_side to at least {need}"
            if param == "max_side"
            else f"raise area to at least {need * MIN_SIDE:,}"
        )
        + (", or ask for a width and height closer to square" if explicit else ", or crop the image closer to square")
    )
    raise InvalidRequestError(param, value, fix)


def _aligned(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(name, value, "give a whole number of pixels")
    aligned = value // ALIGN_EXPLICIT * ALIGN_EXPLICIT
    if aligned != value:
        log.warning("%s=%d is not a multiple of %d; using %d", name, value, ALIGN_EXPLICIT, aligned)
    return aligned


def _check_bounds(width: int, height: int) -> None:
    for name, side in (("width", width), ("height", height)):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise InvalidRequestError(name, side, f"each side must be between {MIN_SIDE} and {MAX_SIDE} px")
    if width * height > MAX_AREA:
        raise InvalidRequestError(
            "width x height", f"{width}x{height}", f"the output may have at most {MAX_AREA:,} pixels (2048x2048)"
        )


# Aspect ratios (w, h) of the buckets at ~1024² area; each bucket is one compiled shape.
BUCKET_RATIOS = [(1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16)]


def buckets(area: int = 1024 * 1024) -> list[tuple[int, int]]:
    """The (width, height) buckets at `area`, multiples of 32."""
    return [fit_area(w, h, area=area) for w, h in BUCKET_RATIOS]


BUCKET_AREAS = (512 * 512, 768 * 768, 1024 * 1024)


def snap_to_bucket(width: int, height: int) -> tuple[int, int]:
    """The bucket nearest to (`width`, `height`): the closest area of `BUCKET_AREAS`, then aspect.

    Example:
        >>> snap_to_bucket(1000, 760)
        (896, 672)
    """
    area = min(BUCKET_AREAS, key=lambda a: abs(a - width * height))
    ratio = width / height
    return min(buckets(area), key=lambda wh: abs(wh[0] / wh[1] - ratio))
