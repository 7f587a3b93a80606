"""Tiled VAE and the prompt/condition cache against the stock diffusers call (qie/core/tolerances.py tolerances)."""

import pytest
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus
from oracle import assert_matches_reference

from qie import Editor, EditRequest

pytestmark = pytest.mark.slow  # runs the stock diffusers pipeline as the reference

SIZE = {"max_side": 256, "condition_area": "output"}


@pytest.fixture(scope="module")
def no_fix_editor(tiny_editor):
    """A second editor on the same tiny pipeline, with qie's prompt fix off and its own cache."""
    return Editor(
        tiny_editor.pipe,
        model="tiny",
        device=tiny_editor.device,
        dtype=tiny_editor.dtype,
        plan=tiny_editor.plan,
        fixes={"mm_token_type_ids": False},
    )


@pytest.fixture(scope="module")
def request_and_reference(no_fix_editor, photo_module):
    request = EditRequest(images=[photo_module], prompt="make the cup red", steps=3, seed=11, **SIZE)
    # The stock pipeline always VAE-encodes its inputs at ~1024²; encoding at the output's area
    # instead (qie's condition_area="output") keeps this test fast. Both sides then encode at the
    # same size, and with fixes off they agree bit for bit (test_cache_hit_is_bit_exact...).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", request.width * request.height)
        return request, no_fix_editor.reference(request)


@pytest.fixture(scope="module")
def photo_module():
    from conftest import EXAMPLES
    from PIL import Image

    return Image.open(EXAMPLES / "coffee-cup.jpg").convert("RGB")


def test_cache_hit_is_bit_exact_against_the_reference(no_fix_editor, request_and_reference):
    request, reference = request_and_reference
    other_seed = EditRequest(images=request.images, prompt=request.prompt, steps=2, seed=99, **SIZE)
    assert "prompt cache hit" not in no_fix_editor.edit(other_seed).notes  # fills the caches
    result = no_fix_editor.edit(request)
    assert {"prompt cache hit", "condition cache hit"} <= set(result.notes)
    diff = assert_matches_reference("prompt_cache", result.image, reference)
    assert diff.max_abs == 0


def test_tiled_vae_within_its_declared_tolerance(no_fix_editor, request_and_reference):
    request, reference = request_and_reference
    tiled = EditRequest(images=request.images, prompt=request.prompt, steps=3, seed=11, tile_size=128, **SIZE)
    result = no_fix_editor.edit(tiled)
    assert "VAE tiled (128 px tiles, 32 px overlap)" in result.notes
    assert "condition cache hit" not in result.notes  # tiling is part of the condition's key
    diff = assert_matches_reference("vae_tiling", result.image, reference)
    assert diff.max_abs > 0  # the tiles really ran (decode 256 x 160 in 3 x 2 tiles)


def test_text_encoder_fp8_within_its_declared_tolerance(request_and_reference):
    request, reference = request_and_reference
    editor = Editor.load("tiny", text_encoder_fp8=True, fixes={"mm_token_type_ids": False})
    diff = assert_matches_reference("text-encoder-fp8", editor.edit(request).image, reference)
    assert diff.max_abs > 0  # the weights really were rounded to fp8
