"""qie's staged path against the stock diffusers call, on the same tiny weights and seed, for both variants."""

import dataclasses

import pytest
from oracle import assert_matches_reference

from qie import EditRequest

pytestmark = pytest.mark.slow  # runs the stock diffusers pipeline as the reference


@pytest.fixture(scope="module", params=["tiny", "tiny-2511"])
def editor(request, tiny_editor, tiny_2511_editor):
    return {"tiny": tiny_editor, "tiny-2511": tiny_2511_editor}[request.param]


@pytest.fixture(scope="module")
def request_and_reference(editor):
    from PIL import Image

    image = Image.open(__import__("conftest").EXAMPLES / "cat.jpg").convert("RGB")
    # Stock diffusers encodes the inputs at ~1024² whatever the output size: ask for the same.
    request = EditRequest(
        images=[image],
        prompt="make the cat wear a red hat",
        steps=3,
        seed=123,
        max_side=128,
        condition_area="model",
        batch_cfg=False,
    )
    return request, editor.reference(request)


def edit_without_fixes(editor, request):
    editor.fixes["mm_token_type_ids"] = False
    try:
        return editor.edit(request).image
    finally:
        editor.fixes["mm_token_type_ids"] = True


def test_default_path_with_fixes_off_is_bit_exact(editor, request_and_reference):
    request, reference = request_and_reference
    diff = assert_matches_reference("default-no-fixes", edit_without_fixes(editor, request), reference)
    assert diff.max_abs == 0


def test_prompt_fix_within_its_declared_tolerance(editor, request_and_reference):
    request, reference = request_and_reference
    assert_matches_reference("mm_token_type_ids", editor.edit(request).image, reference)


def test_without_cfg_also_exact(editor, request_and_reference):
    request, _ = request_and_reference
    no_cfg = dataclasses.replace(request, steps=2, seed=7, true_cfg_scale=1.0)
    assert_matches_reference("default-no-fixes", edit_without_fixes(editor, no_cfg), editor.reference(no_cfg))


def test_automatic_condition_area_within_its_declared_tolerance(editor, request_and_reference):
    """A small output (under ~0.6 MP) encodes its inputs at its own area when condition_area is left to auto."""
    request, reference = request_and_reference
    auto = dataclasses.replace(request, condition_area=None)
    assert auto.condition_area_used == "output"
    editor.fixes["mm_token_type_ids"] = False
    try:
        result = editor.edit(auto)
        explicit = editor.edit(dataclasses.replace(request, condition_area="output"))
    finally:
        editor.fixes["mm_token_type_ids"] = True
    assert "condition_area=auto: output" in result.notes
    assert not any(note.startswith("condition_area=auto") for note in explicit.notes)
    assert result.image.tobytes() == explicit.image.tobytes()
    diff = assert_matches_reference("condition-area-output", result.image, reference)
    assert diff.max_abs > 0  # the condition really was encoded at another size
