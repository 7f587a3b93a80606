"""Price-tag fallback: draw the tag from a template when the price-tag edit fails or its output is blocked.

The render is deterministic (same image and text, same pixels): a red rounded label with white
text in the bottom-right corner, sized to the image. Chinese text needs a CJK font: the first of
`CJK_FONTS` found is used (Debian: `fonts-noto-cjk` or `fonts-wqy-zenhei`); without one, Pillow's
built-in font is used and a WARNING says CJK characters may not show.

Example:
    >>> from PIL import Image
    >>> render_price_tag(Image.new("RGB", (320, 240), "white"), "Sale $19.9").size
    (320, 240)
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from qie.core.request import EditRequest, EditResult
from qie.errors import BusyError, CancelledError, QieError, SafetyError
from qie.settings import read as read_setting

log = logging.getLogger(__name__)

CJK_FONTS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "C:/Windows/Fonts/msyh.ttc",
)
TAG_RED = (200, 16, 46)
TEMPLATE_PLAN = "template"


@functools.lru_cache(maxsize=8)
def find_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A CJK-capable font at `size` px (`$QIE_TAG_FONT` first), else Pillow's default with a WARNING."""
    candidates = [read_setting("tag_font") or "", *CJK_FONTS]
    for path in candidates:
        if path and Path(path).is_file():
            return ImageFont.truetype(path, size)
    log.warning(
        "no CJK font found (tried %s); the price tag uses Pillow's default font and CJK characters may not show. "
        "Install fonts-noto-cjk or fonts-wqy-zenhei, or set QIE_TAG_FONT",
        ", ".join(CJK_FONTS[:3]),
    )
    return ImageFont.load_default(size)


def render_price_tag(image: Image.Image, tag: str) -> Image.Image:
    """`image` with a red price tag saying `tag` in its bottom-right corner (a new RGB image)."""
    out = image.convert("RGB")
    width, height = out.size
    draw = ImageDraw.Draw(out)
    margin = max(4, min(width, height) // 32)
    size = max(10, min(width, height) // 12)
    while True:  # shrink the text until the label fits across the image
        font = find_font(size)
        left, top, right, bottom = draw.textbbox((0, 0), tag, font=font)
        pad = max(4, (bottom - top) // 2)
        box_w, box_h = right - left + 2 * pad, bottom - top + 2 * pad
        if box_w <= width - 2 * margin or size <= 8:
            break
        size = max(8, int(size * 0.85))
    x0, y0 = max(0, width - margin - box_w), max(0, height - margin - box_h)
    draw.rounded_rectangle((x0, y0, x0 + box_w, y0 + box_h), radius=pad, fill=TAG_RED)
    draw.text((x0 + pad - left, y0 + pad - top), tag, font=font, fill="white")
    return out


def fallback_result(request: EditRequest, tag: str, reason: str) -> EditResult:
    """The template render as an `EditResult`, framed like an edit's output, saying why it was used."""
    source = request.images[-1]
    size = request.input_size if request.resize_to_input else (request.width, request.height)
    image = render_price_tag(source.resize(size, Image.Resampling.LANCZOS), tag)
    return EditResult(
        image=image,
        seed=request.seed,
        timings={},
        peak_vram_gib=None,
        model="",
        revision=None,
        plan=TEMPLATE_PLAN,
        steps_run=0,
        notes=(f"price tag drawn from a template because the edit {reason}",),
    )


def tag_in_prompt(prompt: str, tag: str | None) -> bool:
    """Whether `prompt` asks for the price tag `tag` (the price-tag presets put it in quotes)."""
    tag = (tag or "").strip()
    return bool(tag) and tag in prompt


def edit_or_render(editor: Any, request: EditRequest, tag: str, **edit_kwargs: Any) -> EditResult:
    """`editor.edit(request)`, or, if that fails or its output is blocked, the template render of `tag`.

    Cancelled and busy edits are not replaced (the person asked to stop, or nothing ran), nor is a
    blocked input image (a tag drawn on it would bypass the filter).

    Example:
        >>> result = edit_or_render(editor, request, "Sale $19.9")   # doctest: +SKIP
        >>> result.plan, result.notes                               # doctest: +SKIP
        ('template', ('price tag drawn from a template because the edit failed: ...',))
    """
    try:
        return editor.edit(request, **edit_kwargs)
    except (CancelledError, BusyError):
        raise
    except SafetyError as exc:
        if exc.where != "output":
            raise
        reason = f"was blocked ({exc.label} {exc.score:.2f})"
    except (QieError, RuntimeError) as exc:
        reason = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    log.warning("price-tag edit did not succeed (%s); drawing the tag from a template", reason)
    return fallback_result(request, tag, reason)
