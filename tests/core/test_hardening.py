"""Input hardening, table-driven: every bad input gets a clear `QieError` or a documented normalization.

Each case goes through `EditRequest` (the one input boundary) and is followed by a good request,
so a bad input never leaves state behind. The cases are the README's "Limits and behaviour" table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import small_request
from crafted_images import (
    animated,
    encoded,
    file,
    gradient,
    palette_with_transparency,
    raw_png,
    rgb16_png,
    with_exif_orientation,
)
from PIL import Image

from qie import EditRequest, InvalidRequestError, QieError


@dataclass(frozen=True)
class Case:
    """One input: `make(tmp_path)` gives EditRequest keyword arguments; either `error` (param, words)
    is expected, or `check(request, log_text)` passes."""

    id: str
    make: Callable[[Path], dict[str, Any]]
    error: tuple[str, str] | None = None
    check: Callable[[EditRequest, str], bool] | None = None
    env: tuple[tuple[str, str], ...] = ()


def img(source: Any, **kw: Any) -> Callable[[Path], dict[str, Any]]:
    """Kwargs with one image; `source` is bytes, a PIL image, or a function of tmp_path."""
    return lambda tmp: {"images": [source(tmp) if callable(source) else source], **kw}


def first(req: EditRequest) -> Image.Image:
    return req.images[0]


GOOD = gradient()

CASES = [
    # -- unreadable files
    Case("corrupt-png", img(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20), error=("images[0]", "cannot be read")),
    Case("truncated-jpeg", img(encoded(gradient((256, 256)), "JPEG")[:600]), error=("images[0]", "cannot be read")),
    Case("truncated-png", img(encoded(gradient((256, 256)), "PNG")[:300]), error=("images[0]", "cannot be read")),
    Case("zero-byte-file", img(lambda t: file(t, "empty.png", b"")), error=("images[0]", "0 bytes")),
    Case("zero-bytes-upload", img(b""), error=("images[0]", "empty")),
    Case("text-renamed-png", img(lambda t: file(t, "notes.png", b"hello")), error=("images[0]", "cannot be read")),
    Case("svg-renamed-jpg", img(lambda t: file(t, "x.jpg", b"<svg/>")), error=("images[0]", "cannot be read")),
    Case("missing-file", img(lambda t: t / "nope.png"), error=("images[0]", "no such file")),
    Case("not-an-image-type", img({"path": "x.png"}), error=("images[0]", "give a file path")),
    Case("none-image", img(None), error=("images[0]", "give a file path")),
    # -- limits checked before decoding
    Case("bomb-header-60Mpx", img(raw_png(30000, 2000)), error=("images[0]", "more than the limit")),
    Case("bomb-header-400Mpx", img(raw_png(20000, 20000)), error=("images[0]", "more pixels than the limit")),
    Case(
        "file-over-byte-limit",
        img(encoded(GOOD, "PNG")),
        error=("images[0]", "larger than the limit"),
        env=(("QIE_MAX_INPUT_BYTES", "100"),),
    ),
    # -- sizes
    Case("one-pixel", img(Image.new("RGB", (1, 1))), error=("images[0]", "at least 8 px")),
    Case(
        "side-20000px",
        img(Image.new("RGB", (20000, 1250), (9, 9, 9)), max_side=None),
        check=lambda r, _: r.width <= 4096 and abs(r.width / r.height - 16) < 1,
    ),
    Case("aspect-200-to-1", img(Image.new("RGB", (20000, 100))), error=("images[0]", "aspect ratio")),
    # -- modes (normalized to RGB; alpha composited on white)
    Case("cmyk-jpeg", img(encoded(gradient(mode="CMYK"), "JPEG")), check=lambda r, _: first(r).mode == "RGB"),
    Case(
        "gray-16bit-png",
        img(encoded(Image.new("I;16", (32, 32), 65535), "PNG")),
        check=lambda r, _: first(r).getpixel((0, 0)) == (255, 255, 255),
    ),
    Case("rgb-16bit-png", img(rgb16_png()), check=lambda r, _: first(r).getpixel((0, 0)) == (255, 128, 0)),
    Case("palette", img(encoded(gradient(mode="P"), "PNG")), check=lambda r, _: first(r).mode == "RGB"),
    Case(
        "palette-transparency",
        img(palette_with_transparency()),
        check=lambda r, _: first(r).getpixel((0, 0)) == (255, 255, 255) and first(r).getpixel((31, 0)) == (0, 0, 255),
    ),
    Case("grayscale", img(Image.new("L", (32, 32), 100)), check=lambda r, _: first(r).getpixel((0, 0)) == (100,) * 3),
    Case(
        "gray-alpha-LA",
        img(encoded(Image.new("LA", (32, 32), (0, 0)), "PNG")),
        check=lambda r, _: first(r).getpixel((0, 0)) == (255, 255, 255),
    ),
    Case(
        "rgba-half-transparent",
        img(Image.new("RGBA", (32, 32), (0, 0, 0, 128))),
        check=lambda r, _: first(r).getpixel((0, 0)) == (127, 127, 127),
    ),
    Case("bilevel", img(encoded(Image.new("1", (32, 32), 1), "PNG")), check=lambda r, _: first(r).mode == "RGB"),
    Case(
        "float-tiff",
        img(encoded(Image.new("F", (32, 32), 0.5), "TIFF")),
        check=lambda r, _: first(r).mode == "RGB",
    ),
    Case("exif-rotate-90", img(with_exif_orientation(6)), check=lambda r, _: first(r).size == (32, 64)),
    Case(
        "animated-gif",
        img(animated("GIF")),
        check=lambda r, log: "animated" in log and first(r).getpixel((0, 0))[0] > 200,
    ),
    Case(
        "animated-webp",
        img(animated("WEBP")),
        check=lambda r, log: "animated" in log and first(r).getpixel((0, 0))[0] > 200,
    ),
    # -- image count
    Case("four-images", lambda t: {"images": [GOOD] * 4}, error=("images", "1 to 3 images")),
    Case("no-images", lambda t: {"images": []}, error=("images", "1 to 3 images")),
    # -- prompts
    Case("empty-prompt", img(GOOD, prompt=""), error=("prompt", "describe the edit")),
    Case("whitespace-prompt", img(GOOD, prompt=" \n\t "), error=("prompt", "describe the edit")),
    Case("control-only-prompt", img(GOOD, prompt="\x00\x07\x1b"), error=("prompt", "describe the edit")),
    Case("long-prompt", img(GOOD, prompt="make it white " * 200), error=("prompt", "at most 2000 characters")),
    Case("bytes-prompt", img(GOOD, prompt=b"white"), error=("prompt", "give text")),
    Case(
        "control-chars-stripped",
        img(GOOD, prompt="white\x00 back\u202eground\x1b"),
        check=lambda r, _: r.prompt == "white background",
    ),
    # -- sampling parameters
    Case("steps-0", img(GOOD, steps=0), error=("steps", "from 2 to 100")),
    Case("steps-1000", img(GOOD, steps=1000), error=("steps", "from 2 to 100")),
    Case("steps-string", img(GOOD, steps="40"), error=("steps", "whole number")),
    Case("steps-nan", img(GOOD, steps=float("nan")), error=("steps", "whole number")),
    Case("cfg-nan", img(GOOD, true_cfg_scale=float("nan")), error=("true_cfg_scale", "1.0 (off)")),
    Case("cfg-inf", img(GOOD, true_cfg_scale=float("inf")), error=("true_cfg_scale", "1.0 (off)")),
    Case("seed-negative", img(GOOD, seed=-5), error=("seed", "whole number")),
    Case("seed-too-big", img(GOOD, seed=2**40), error=("seed", "whole number")),
    Case("seed-numpy", img(GOOD, seed=np.int64(7)), check=lambda r, _: r.seed == 7 and type(r.seed) is int),
    Case("width-huge", img(GOOD, width=20000, height=512, max_side=None), error=("width", "between 64 and 4096")),
    Case("height-only", img(GOOD, height=512), error=("height", "give width too")),
    Case("max-side-tiny", img(GOOD, max_side=8), error=("max_side", "at least 64")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_input_case(case: Case, tmp_path, monkeypatch, caplog):
    for key, value in case.env:
        monkeypatch.setenv(key, value)
    kwargs = {"prompt": "white background", "max_side": 128, **case.make(tmp_path)}
    with caplog.at_level(logging.WARNING):
        if case.error is not None:
            param, words = case.error
            with pytest.raises(InvalidRequestError) as info:
                EditRequest(**kwargs)
            assert info.value.param == param, str(info.value)
            assert words in str(info.value), str(info.value)
            assert "Traceback" not in str(info.value)
        else:
            request = EditRequest(**kwargs)
            assert case.check(request, caplog.text), (case.id, [im.size for im in request.images])
    # The boundary keeps no state: the next (good) request is fine.
    assert EditRequest(images=[GOOD], prompt="white background", max_side=128).images[0].mode == "RGB"


def test_table_covers_at_least_25_cases():
    assert len(CASES) >= 25


def test_token_limit_is_a_clear_error_and_the_editor_goes_on(tiny_editor, photo):
    # Under the character limit, over the text encoder's 1024 tokens (CJK text is token-dense).
    wordy = "把背景换成白色" * 60
    with pytest.raises(InvalidRequestError, match="at most 1024 tokens") as info:
        tiny_editor.edit(small_request(photo, prompt=wordy, steps=2, max_side=96))
    assert isinstance(info.value, QieError) and info.value.param == "prompt"
    assert not tiny_editor.lock.locked()
    assert tiny_editor.edit(small_request(photo, steps=2, max_side=96)).image.size == (96, 64)
