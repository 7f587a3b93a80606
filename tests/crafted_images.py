"""Image files made by hand for the input-hardening tests (odd headers, animations, EXIF, palettes)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, *, bit_depth: int = 8, color_type: int = 2, rows: bytes | None = None) -> bytes:
    """A PNG written by hand: its header may promise any size, its pixel data may be short."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    data = zlib.compress(rows if rows is not None else b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(size=(64, 48), mode="RGB") -> Image.Image:
    x = np.linspace(0, 255, size[0], dtype=np.uint8)
    rgb = np.stack([np.tile(x, (size[1], 1))] * 3, axis=-1)
    return Image.fromarray(rgb).convert(mode)


def file(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    return encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)


def with_exif_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(gradient((64, 32)), "JPEG", exif=exif)


def palette_with_transparency() -> bytes:
    img = Image.new("P", (32, 32), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (16, 0, 32, 32))
    return encoded(img, "PNG", transparency=0)  # index 0 (red, left half) is transparent


def rgb16_png() -> bytes:
    pixel = struct.pack(">HHH", 65535, 32768, 0)  # 16 bits per channel, big-endian
    rows = b"".join(b"\0" + pixel * 16 for _ in range(16))
    return raw_png(16, 16, bit_depth=16, color_type=2, rows=rows)
