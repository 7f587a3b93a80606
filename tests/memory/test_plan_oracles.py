"""Memory plans against the stock diffusers reference, on the tiny model (CPU)."""

import pytest
import torch
from conftest import EXAMPLES
from oracle import assert_matches_reference
from PIL import Image

from qie import Editor, EditRequest
from qie.memory.plans import PLANS, measure_sizes, resident_blocks

pytestmark = pytest.mark.slow  # runs the stock diffusers pipeline as the reference


@pytest.fixture(scope="module")
def case(tiny_editor):
    image = Image.open(EXAMPLES / "rocket.jpg").convert("RGB")
    request = EditRequest(images=[image], prompt="make the sky deep blue", steps=3, seed=5, max_side=128)
    with pytest.MonkeyPatch.context() as patch:
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

        # Encode the condition at the output's area on both sides: same comparison, CPU-cheap.
        patch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", request.width * request.height)
        return request, tiny_editor.reference(request)


@pytest.mark.parametrize("compute", ["upcast", "fp8"])
def test_stream_plan_with_fp8_rows_stays_within_its_tolerance(case, monkeypatch, compute):
    request, reference = case
    monkeypatch.setattr("qie.memory.streaming.compute_mode", lambda device, requested: compute)
    editor = Editor.load("tiny", fixes={"mm_token_type_ids": False})  # its own pipeline: the plan rewires it
    sizes = measure_sizes(editor.pipe)
    budget = PLANS["stream"].need_gib(sizes) + sizes.blocks_fp8[0] * 1.5  # room for one resident block
    monkeypatch.setattr("qie.memory.plans.usable", lambda b: b)
    assert resident_blocks(sizes, budget) == 1  # one block resident, one streamed
    PLANS["stream"].apply(editor.pipe, torch.device("cpu"), budget)
    monkeypatch.setattr("qie.core.grouping.VAE_IMAGE_SIZE", request.width * request.height)
    image = editor.edit(request).image
    diff = assert_matches_reference("plan-stream" if compute == "upcast" else "plan-stream-fp8", image, reference)
    assert diff.max_abs > 0  # fp8 weights do change the numbers: the test can tell


def test_compiled_editor_snaps_sizes_to_buckets(tiny_editor, photo, caplog):
    from conftest import clone_editor, small_request

    from qie.core.geometry import BUCKET_AREAS, buckets

    editor = clone_editor(tiny_editor, compiled=True)  # as after enable_compile: sizes must stay in buckets
    request = small_request(photo, max_side=None, width=400, height=304, steps=2)
    result = editor.edit(request)
    assert result.image.size in {b for area in BUCKET_AREAS for b in buckets(area)}
    assert result.image.size == (576, 448)  # 4:3 (rounded to multiples of 32) at 512² area
    assert "snapped to the size bucket" in caplog.text
