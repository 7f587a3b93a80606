"""The price-tag fallback: a deterministic template render, used (and said so) when the edit fails."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from conftest import clone_editor, small_request
from PIL import Image

from qie import CancelledError, SafetyError
from qie.app.pricetag import CJK_FONTS, edit_or_render, find_font, render_price_tag, tag_in_prompt
from qie.core import faults
from qie.core.safety import SafetyFilter


def red_pixels(image: Image.Image) -> np.ndarray:
    a = np.asarray(image, dtype=np.int16)
    return (a[..., 0] > 150) & (a[..., 1] < 60) & (a[..., 2] < 90)


def test_render_is_deterministic_and_in_the_corner(photo):
    a, b = render_price_tag(photo, "Sale $19.9"), render_price_tag(photo, "Sale $19.9")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    red = red_pixels(a) & ~red_pixels(photo)
    rows, cols = np.nonzero(red)
    assert red.sum() > 1000 and rows.min() > photo.height // 2 and cols.min() > photo.width // 2
    assert not np.array_equal(np.asarray(a), np.asarray(render_price_tag(photo, "Sale $29.9")))
    assert render_price_tag(Image.new("RGB", (64, 64)), "A very long price tag text").size == (64, 64)


@pytest.mark.skipif(not any(os.path.isfile(p) for p in CJK_FONTS), reason="no CJK font installed")
def test_cjk_text_is_drawn():
    blank = Image.new("RGB", (256, 128), "white")
    tag = np.asarray(render_price_tag(blank, "特价 ¥99"))
    box = tag[red_pixels(Image.fromarray(tag)).any(axis=1)]
    assert (box.min(axis=-1) > 200).sum() > 100  # white glyph strokes inside the red label
    assert not np.array_equal(tag, np.asarray(render_price_tag(blank, "折扣 ¥99")))


def test_no_cjk_font_falls_back_with_warning(monkeypatch, caplog):
    monkeypatch.setattr("qie.app.pricetag.CJK_FONTS", ())
    monkeypatch.delenv("QIE_TAG_FONT", raising=False)
    find_font.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            find_font(20)
            render_price_tag(Image.new("RGB", (128, 128)), "Sale")
    finally:
        find_font.cache_clear()
    assert "no CJK font found" in caplog.text


def test_tag_in_prompt():
    assert tag_in_prompt("Add a red price tag that says 'Sale $19.9'", "Sale $19.9")
    assert not tag_in_prompt("white background", "Sale $19.9") and not tag_in_prompt("x", "  ")


def test_failed_edit_falls_back_to_the_template_and_says_so(tiny_editor, photo, caplog):
    request = small_request(photo, prompt="add a price tag 'Sale $19.9'", steps=2)
    with faults.inject(tiny_editor.pipe.transformer, error="runtime"), caplog.at_level(logging.WARNING):
        result = edit_or_render(tiny_editor, request, "Sale $19.9")
    assert result.plan == "template" and result.steps_run == 0
    assert result.image.size == (request.width, request.height)
    assert "price tag drawn from a template because the edit failed: RuntimeError" in result.notes[0]
    assert "drawing the tag from a template" in caplog.text
    assert edit_or_render(tiny_editor, request, "Sale $19.9").plan == "resident"  # a working edit is used


def test_blocked_output_falls_back_but_blocked_input_does_not(tmp_path, tiny_editor, photo):
    from safety_models import tiny_nsfw_classifier

    folder = tiny_nsfw_classifier(tmp_path / "nsfw", verdict="nsfw")
    request = small_request(photo, steps=2)
    outputs_only = clone_editor(tiny_editor, safety=SafetyFilter.load(str(folder), inputs=False))
    result = edit_or_render(outputs_only, request, "Sale")
    assert result.plan == "template" and "was blocked (nsfw 1.00)" in result.notes[0]
    both = clone_editor(tiny_editor, safety=SafetyFilter.load(str(folder)))
    with pytest.raises(SafetyError, match="images\\[0\\]"):
        edit_or_render(both, request, "Sale")


def test_cancel_is_not_replaced(tiny_editor, photo):
    import threading

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        edit_or_render(tiny_editor, small_request(photo, steps=2), "Sale", cancel=cancel)
