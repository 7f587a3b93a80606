"""Masked / region edits (qie/core/masking.py): the original's pixels outside the region, exactly."""

import numpy as np
import pytest
from conftest import small_request
from PIL import Image

from qie import InvalidRequestError
from qie.core.masking import box_mask, composite, feather_alpha, region_mask


def noise(size, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def px(image):
    return np.asarray(image, dtype=np.int16)


def test_outside_is_original_inside_is_edit_edge_is_monotonic():
    size, box, feather = (96, 64), (40, 20, 96, 64), 8  # touches the right and bottom borders
    original, edited = noise(size, 0), noise(size, 1)
    out = px(composite(original, edited, box_mask(size, box), feather))
    inside = np.zeros((64, 96), dtype=bool)
    inside[20:, 40:] = True
    assert np.array_equal(out[~inside], px(original)[~inside])  # every pixel outside: the original's
    deep = np.zeros_like(inside)
    deep[20 + feather :, 40 + feather :] = True  # no fade at the image border
    assert np.array_equal(out[deep], px(edited)[deep])
    band = inside & ~deep
    assert not np.array_equal(out[band], px(edited)[band])  # the edge really blends

    ramp = px(composite(Image.new("RGB", size, "black"), Image.new("RGB", size, "white"), box_mask(size, box), 8))
    line = ramp[40, :, 0]  # a row crossing the box's left edge
    assert np.all(np.diff(line.astype(int)) >= 0)
    assert line[39] == 0 and line[40] > 0 and line[40 + feather] == 255 and line[40 + feather - 1] < 255


def test_feather_zero_is_a_hard_edge_and_alpha_is_zero_outside():
    inside = np.zeros((32, 32), dtype=bool)
    inside[8:24, 8:24] = True
    assert np.array_equal(feather_alpha(inside, 0), inside.astype(float))
    alpha = feather_alpha(inside, 4)
    assert alpha[~inside].max() == 0.0 and alpha[16, 16] == 1.0 and 0 < alpha[8, 16] < alpha[10, 16] < 1


def test_box_scales_outward_to_the_output_size():
    mask = np.asarray(region_mask((50, 50), (100, 100), box=(11, 11, 31, 31)))
    rows, cols = np.nonzero(mask)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (5, 15, 5, 15)  # 5.5 -> 5, 15.5 -> 16 (exclusive)


@pytest.mark.slow
def test_masked_edit_keeps_the_input_pixels_exactly(tiny_editor, photo):
    box = (300, 200, 600, 400)  # the bottom-right quarter of the 600 x 400 photo
    free = tiny_editor.edit(small_request(photo, resize_to_input=True))
    masked = tiny_editor.edit(small_request(photo, resize_to_input=True, box=box, mask_feather=6))
    out, original, edit = px(masked.image), px(photo), px(free.image)
    assert masked.image.size == photo.size
    outside = np.ones(out.shape[:2], dtype=bool)
    outside[200:, 300:] = False
    assert np.array_equal(out[outside], original[outside])
    assert np.array_equal(out[206:, 306:], edit[206:, 306:])  # beyond the feather: the edit's pixels
    assert "kept the original outside the box" in masked.notes


def test_masked_edit_at_output_size_with_a_painted_mask(tiny_editor, photo):
    paint = np.zeros((photo.height, photo.width), dtype=np.uint8)
    paint[:, 300:] = 255  # the right half
    result = tiny_editor.edit(small_request(photo, mask=Image.fromarray(paint, mode="L"), mask_feather=0))
    out = px(result.image)
    expected = px(photo.resize(result.image.size, Image.Resampling.LANCZOS))
    assert np.array_equal(out[:, :64], expected[:, :64])  # 128 x 96 output: the left half is the input
    assert not np.array_equal(out[:, 64:], expected[:, 64:])


@pytest.mark.parametrize(
    ("kwargs", "param", "fix"),
    [
        ({"box": (0, 0, 10)}, "box", "(x0, y0, x1, y1)"),
        ({"box": (10, 10, 5, 20)}, "box", "0 <= x0 < x1 <= 600"),
        ({"box": (0, 0, 601, 20)}, "box", "0 <= y0 < y1 <= 400"),
        ({"box": (0.5, 0, 10, 10)}, "box", "whole pixels"),
        ({"box": (0, 0, 10, 10), "mask": Image.new("L", (600, 400), 255)}, "box", "not both"),
        ({"mask": Image.new("L", (60, 40), 255)}, "mask", "the size of the last input image (600x400)"),
        ({"mask": Image.new("L", (600, 400), 0)}, "mask", "paint the region to edit white"),
        ({"box": (0, 0, 10, 10), "mask_feather": -1}, "mask_feather", "whole number from 0"),
    ],
)
def test_bad_regions_are_refused_with_the_fix(photo, kwargs, param, fix):
    with pytest.raises(InvalidRequestError) as err:
        small_request(photo, **kwargs)
    assert err.value.param == param and fix in err.value.fix
    assert str(err.value).startswith(f"{param}=")
