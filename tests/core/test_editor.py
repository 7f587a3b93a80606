"""End to end through `Editor` on the tiny pipeline."""

import threading

import numpy as np
import pytest
from conftest import small_request

from qie import BusyError, CancelledError


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_edit_end_to_end(tiny_editor, photo):
    result = tiny_editor.edit(small_request(photo))
    assert result.image.size == (128, 96)
    assert result.image.mode == "RGB"
    assert set(result.timings) == {"text_encode", "condition_encode", "denoise", "decode"}
    assert all(t >= 0 for t in result.timings.values())
    assert result.peak_vram_gib is None  # CPU
    assert result.model == "tiny" and result.plan == "resident" and result.steps_run == 3
    assert "seed 1" in result.summary()


@pytest.mark.slow
def test_same_seed_same_pixels_other_seed_differs(tiny_editor, photo):
    a = tiny_editor.edit(small_request(photo, seed=5)).image
    b = tiny_editor.edit(small_request(photo, seed=5)).image
    c = tiny_editor.edit(small_request(photo, seed=6)).image
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


def test_resize_to_input(tiny_editor, photo):
    result = tiny_editor.edit(small_request(photo, resize_to_input=True))
    assert result.image.size == photo.size


def test_progress_callback_counts_steps(tiny_editor, photo):
    seen = []
    tiny_editor.edit(small_request(photo, steps=4), on_step=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_cancel_stops_and_editor_stays_usable(tiny_editor, photo):
    cancel = threading.Event()

    def stop_after_first(i, n):
        cancel.set()

    with pytest.raises(CancelledError, match="after 1 of 5 steps"):
        tiny_editor.edit(small_request(photo, steps=5), on_step=stop_after_first, cancel=cancel)
    assert not tiny_editor.lock.locked()
    assert tiny_editor.edit(small_request(photo)).image.size == (128, 96)


def test_busy_when_lock_held(tiny_editor, photo):
    request = small_request(photo)
    with tiny_editor.lock, pytest.raises(BusyError, match="busy"):
        tiny_editor.edit(request, timeout=0.05)


@pytest.mark.slow
def test_multi_image_edit(tiny_editor, photo):
    from PIL import Image

    other = Image.new("RGB", (300, 300), (0, 0, 255))
    result = tiny_editor.edit(_two(photo, other))
    assert result.image.size == (128, 128)  # framed like the last image


def _two(first, second):
    from qie import EditRequest

    return EditRequest(
        images=[first, second],
        prompt="put the cup on the blue cloth",
        steps=2,
        seed=0,
        max_side=128,
        condition_area="output",
    )
