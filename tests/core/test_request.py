"""Validation at the one input boundary: each bad value gets an error naming it and the fix."""

import dataclasses
import io
import logging

import pytest
from PIL import Image

from qie import EditRequest, ImageError, InvalidRequestError


@pytest.fixture()
def img():
    return Image.new("RGB", (640, 480), (10, 200, 30))


@pytest.mark.parametrize(
    ("kwargs", "param", "fix_words"),
    [
        ({"prompt": ""}, "prompt", "describe the edit"),
        ({"prompt": "   \n\t"}, "prompt", "describe the edit"),
        ({"prompt": "x" * 2001}, "prompt", "at most 2000"),
        ({"prompt": 42}, "prompt", "give text"),
        ({"steps": 1}, "steps", "from 2 to 100"),
        ({"steps": 101}, "steps", "from 2 to 100"),
        ({"steps": 2.5}, "steps", "whole number"),
        ({"true_cfg_scale": 0.5}, "true_cfg_scale", "1.0 (off)"),
        ({"true_cfg_scale": 25}, "true_cfg_scale", "1.0 (off)"),
        ({"seed": -1}, "seed", "whole number"),
        ({"seed": 2**32}, "seed", "whole number"),
        ({"height": 512}, "height", "give width too"),
        ({"height": 32, "width": 32}, "width", "between 64"),
        ({"height": 4096, "width": 4096}, "width x height", "at most"),
        ({"max_side": 10}, "max_side", "at least 64"),
        ({"condition_area": "huge"}, "condition_area", "one of"),
    ],
)
def test_bad_parameters_name_the_parameter(img, kwargs, param, fix_words):
    params = {"images": [img], "prompt": "white background", **kwargs}
    with pytest.raises(InvalidRequestError) as info:
        EditRequest(**params)
    assert info.value.param == param
    assert param in str(info.value) and fix_words in str(info.value)


def test_too_many_and_too_few_images(img):
    with pytest.raises(InvalidRequestError, match="1 to 3 images"):
        EditRequest(images=[img] * 4, prompt="x")
    with pytest.raises(InvalidRequestError, match="1 to 3 images"):
        EditRequest(images=[], prompt="x")


def test_unreadable_files(tmp_path, img):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("hello")
    for path, words in [
        (corrupt, "cannot be read"),
        (empty, "empty"),
        (text, "cannot be read"),
        (tmp_path / "missing.png", "no such file"),
    ]:
        with pytest.raises(ImageError) as info:
            EditRequest(images=[path], prompt="x")
        assert words in str(info.value)
        assert info.value.param == "images[0]"


def test_decompression_bomb_refused_before_decoding(monkeypatch):
    monkeypatch.setenv("QIE_MAX_INPUT_PIXELS", "10000")
    buf = io.BytesIO()
    Image.new("RGB", (200, 200)).save(buf, format="PNG")
    with pytest.raises(ImageError, match="more than the limit"):
        EditRequest(images=[buf.getvalue()], prompt="x")


def test_modes_are_normalized_to_rgb():
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red
    req = EditRequest(images=[rgba, Image.new("L", (64, 64)), Image.new("CMYK", (64, 64))], prompt="x")
    assert all(im.mode == "RGB" for im in req.images)
    assert req.images[0].getpixel((0, 0)) == (255, 255, 255)  # alpha composited on white


def test_defaults_settle_seed_and_size(img):
    req = EditRequest(images=[img], prompt="  white background  ")
    assert req.prompt == "white background"
    assert isinstance(req.seed, int) and 0 <= req.seed < 2**32
    assert (req.width, req.height) == (1184, 896)
    assert req.width % 32 == 0 and req.height % 32 == 0
    assert req.uses_cfg
    assert not EditRequest(images=[img], prompt="x", true_cfg_scale=1.0).uses_cfg


def test_explicit_size_rounded_to_16_with_warning(img, caplog):
    with caplog.at_level(logging.WARNING):
        req = EditRequest(images=[img], prompt="x", width=500, height=300)
    assert (req.width, req.height) == (496, 288)
    assert "not a multiple of 16" in caplog.text


def test_request_is_frozen(img):
    req = EditRequest(images=[img], prompt="x")
    with pytest.raises(AttributeError):
        req.prompt = "y"


def test_free_form_options_are_refused_with_the_typed_fields_to_use(img):
    # A mapping nothing read used to be accepted and ignored: say which typed field does the job.
    with pytest.raises(InvalidRequestError, match="^options=.*typed fields.*step_cache_threshold=0.1") as bad:
        EditRequest(images=[img], prompt="x", options={"step_cache": 0.1})
    assert bad.value.param == "options"
    assert "options" not in {f.name for f in dataclasses.fields(EditRequest(images=[img], prompt="x", options={}))}
    assert "options" not in EditRequest(images=[img], prompt="x").parameters()


def test_control_characters_removed(img):
    req = EditRequest(images=[img], prompt="white\x00 back\x07ground\nplease")
    assert req.prompt == "white background\nplease"


@pytest.mark.parametrize(
    "given,side,used",
    [
        (None, 768, "output"),  # 589,824 px: under ~0.6 MP
        ("auto", 768, "output"),
        (None, 1024, "model"),
        ("model", 512, "model"),  # an explicit choice is kept
        ("output", 1024, "output"),
    ],
)
def test_condition_area_auto_picks_output_for_small_outputs(img, given, side, used):
    request = EditRequest(images=[img], prompt="x", width=side, height=side, condition_area=given)
    assert request.condition_area_used == used
    assert request.condition_area == (None if given == "auto" else given)
    assert request.parameters()["condition_area"] == used  # cache keys and metadata hold the area used
