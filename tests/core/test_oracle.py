"""qie's staged path against the stock diffusers call, on the same tiny weights and seed."""

import pytest
from oracle import assert_matches_reference

from qie import EditRequest


@pytest.fixture(scope="module")
def request_and_reference(tiny_editor):
    from PIL import Image

    image = Image.open(__import__("conftest").EXAMPLES / "cat.jpg").convert("RGB")
    request = EditRequest(images=[image], prompt="make the cat wear a red hat", steps=3, seed=123, max_side=128)
    return request, tiny_editor.reference(request)


def test_default_path_with_fixes_off_is_bit_exact(tiny_editor, request_and_reference):
    request, reference = request_and_reference
    tiny_editor.fixes["mm_token_type_ids"] = False
    try:
        image = tiny_editor.edit(request).image
    finally:
        tiny_editor.fixes["mm_token_type_ids"] = True
    diff = assert_matches_reference("default-no-fixes", image, reference)
    assert diff.max_abs == 0


def test_prompt_fix_within_its_declared_tolerance(tiny_editor, request_and_reference):
    request, reference = request_and_reference
    assert_matches_reference("mm_token_type_ids", tiny_editor.edit(request).image, reference)


def test_without_cfg_also_exact(tiny_editor, request_and_reference):
    request, _ = request_and_reference
    no_cfg = EditRequest(
        images=request.images, prompt=request.prompt, steps=2, seed=7, max_side=128, true_cfg_scale=1.0
    )
    tiny_editor.fixes["mm_token_type_ids"] = False
    try:
        image = tiny_editor.edit(no_cfg).image
    finally:
        tiny_editor.fixes["mm_token_type_ids"] = True
    assert_matches_reference("default-no-fixes", image, tiny_editor.reference(no_cfg))
