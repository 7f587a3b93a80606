"""Opening, normalizing and saving images: the one place that touches image files.

Input images become RGB `PIL.Image`s: EXIF orientation applied, alpha composited on white,
palette / grayscale / CMYK / 16-bit converted, animated images reduced to their first frame.
Files above `MAX_INPUT_BYTES` and images above `MAX_INPUT_PIXELS` are refused before their pixels
are decoded; sides below `MIN_INPUT_SIDE` and aspect ratios beyond `MAX_ASPECT` are refused.

Alpha policy: transparent pixels are composited on white (the usual product-photo background)
and the output has no alpha channel.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from qie.errors import ImageError
from qie.settings import read as read_setting

log = logging.getLogger(__name__)

MAX_INPUT_PIXELS = 40_000_000  # ~ 6300 x 6300; overridable with QIE_MAX_INPUT_PIXELS
MAX_INPUT_BYTES = 50 * 2**20  # overridable with QIE_MAX_INPUT_BYTES
MIN_INPUT_SIDE = 8
MAX_ASPECT = 16  # beyond this the output cannot keep the aspect within the output size limits
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")

ImageInput = Image.Image | str | os.PathLike | bytes


def max_input_pixels() -> int:
    """The pixel limit for one input image (env `QIE_MAX_INPUT_PIXELS` overrides the default)."""
    return read_setting("max_input_pixels") or MAX_INPUT_PIXELS


def max_input_bytes() -> int:
    """The size limit for one input file (env `QIE_MAX_INPUT_BYTES` overrides the default)."""
    return read_setting("max_input_bytes") or MAX_INPUT_BYTES


def load_image(source: ImageInput, name: str = "image") -> Image.Image:
    """Open `source` (a path, raw bytes or a PIL image) as a normalized RGB image.

    Raises `ImageError` naming `name` when the file is missing, unreadable or outside the limits.

    Example:
        >>> from PIL import Image
        >>> load_image(Image.new("RGBA", (32, 16))).mode
        'RGB'
    """
    if isinstance(source, Image.Image):
        return normalize_image(source, name)
    if isinstance(source, bytes):
        if not source:
            raise ImageError(name, "<0 bytes>", "the upload is empty; send a PNG, JPEG or WebP file")
        _check_bytes(name, "<bytes>", len(source))
        return _open(io.BytesIO(source), name, "<bytes>")
    if not isinstance(source, (str, os.PathLike)):
        raise ImageError(name, f"<{type(source).__name__}>", "give a file path, the file's bytes or a PIL image")
    path = Path(source)
    if not path.is_file():
        raise ImageError(name, str(path), "no such file; check the path")
    if path.stat().st_size == 0:
        raise ImageError(name, str(path), "the file is empty (0 bytes); use a PNG, JPEG or WebP image")
    _check_bytes(name, str(path), path.stat().st_size)
    with path.open("rb") as fh:
        return _open(fh, name, str(path))


def _check_bytes(name: str, shown: str, size: int) -> None:
    limit = max_input_bytes()
    if size > limit:
        raise ImageError(
            name,
            f"{shown} ({size / 2**20:.1f} MiB)",
            f"the file is larger than the limit of {limit / 2**20:.0f} MiB; "
            "compress or downscale it (or raise QIE_MAX_INPUT_BYTES)",
        )


def _too_many_pixels(name: str, shown: str, width: int, height: int, limit: int) -> ImageError:
    return ImageError(
        name,
        f"{shown} ({width}x{height})",
        f"the image has {width * height:,} pixels, more than the limit of {limit:,}; "
        "downscale it first (or raise QIE_MAX_INPUT_PIXELS)",
    )


def _open(fh: Any, name: str, shown: str) -> Image.Image:
    limit = max_input_pixels()
    try:
        with Image.open(fh) as img:
            width, height = img.size  # read from the header: nothing decoded yet
            if width * height > limit:
                raise _too_many_pixels(name, shown, width, height, limit)
            img.load()
            return normalize_image(img, name)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        # Pillow refuses far larger images itself, before qie sees the header's size.
        size = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = int(size.group(1)) if size else 0
        raise ImageError(
            name,
            f"{shown} ({pixels:,} pixels)" if pixels else shown,
            f"the image has more pixels than the limit of {limit:,}; downscale it first",
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise ImageError(
            name, shown, f"cannot be read as an image ({type(exc).__name__}); use a PNG, JPEG or WebP file"
        ) from exc


def normalize_image(img: Image.Image, name: str = "image") -> Image.Image:
    """Return an RGB copy of `img`: first frame, EXIF-upright, alpha composited on white.

    Example:
        >>> normalize_image(Image.new("LA", (16, 16))).mode
        'RGB'
    """
    # `is_animated` stops at the second frame; `n_frames` would walk a frame bomb to its end.
    if getattr(img, "is_animated", False):
        log.warning("%s is animated; using the first frame", name)
        img.seek(0)
    try:
        img = ImageOps.exif_transpose(img) or img
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        log.warning("%s: unreadable EXIF orientation (%s); using the image as stored", name, exc)
    width, height = img.size
    if min(width, height) < MIN_INPUT_SIDE:
        raise ImageError(
            name, f"{width}x{height}", f"both sides must be at least {MIN_INPUT_SIDE} px; use a larger image"
        )
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageError(
            name,
            f"{width}x{height}",
            f"the aspect ratio is beyond {MAX_ASPECT}:1; crop it to at most {MAX_ASPECT}:1",
        )
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit integer gray: scale to 8 bit instead of clipping.
        img = img.point(lambda v: v / 256).convert("L")
    elif img.mode == "F":
        low, high = img.getextrema()  # float gray has no fixed range: stretch it to 8 bit
        img = img.point(lambda v: (v - low) * 255 / ((high - low) or 1)).convert("L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGB" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img.copy()


def save_png(image: Image.Image, path: str | os.PathLike, metadata: Mapping[str, Any]) -> Path:
    """Save `image` as PNG with `metadata` as text chunks (one per key, plus all of it as JSON).

    The file is written beside its final name and renamed, so a batch that is stopped never
    leaves a half-written output that a resumed run would skip.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    image.save(partial, format="PNG", pnginfo=png_info(metadata))
    partial.replace(path)
    return path


def png_info(metadata: Mapping[str, Any]) -> PngImagePlugin.PngInfo:
    """`metadata` as PNG text chunks: one per key, plus all of it as JSON under "qie"."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_itxt(key, value if isinstance(value, str) else json.dumps(value))
    info.add_itxt("qie", json.dumps(dict(metadata), default=str))
    return info


def png_bytes(image: Image.Image, metadata: Mapping[str, Any]) -> bytes:
    """`image` encoded as PNG with `metadata` (as `save_png` writes it), for HTTP answers and caches.

    Example:
        >>> png_bytes(Image.new("RGB", (8, 8)), {"seed": 1})[:8]
        b'\\x89PNG\\r\\n\\x1a\\n'
    """
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(metadata))
    return buffer.getvalue()


def read_png_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The edit parameters saved by `save_png` in `path`."""
    with Image.open(path) as img:
        text = img.text.get("qie")
    return json.loads(text) if text else {}


def image_digest(image: Image.Image) -> str:
    """A hex digest of an image's mode, size and pixels (equal pixels, equal digest), for cache keys.

    Example:
        >>> image_digest(Image.new("RGB", (4, 4))) == image_digest(Image.new("RGB", (4, 4)))
        True
    """
    # SHA-256 rather than BLAKE2b: CPUs with SHA extensions hash a 1024² image's 3 MiB in ~2 ms
    # (BLAKE2b ~7 ms on the H200 machine's host), and an edit hashes its inputs before anything else.
    digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()[:40]
