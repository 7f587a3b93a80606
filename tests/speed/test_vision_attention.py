"""The vision tower's windowed attention as one masked SDPA call: same outputs, one call per block."""

import copy

import torch
from conftest import small_request
from oracle import assert_installed_option_within

from qie.core import stages
from qie.speed import vision_attention


def test_window_mask_marks_patches_of_one_window():
    mask = vision_attention.window_mask(torch.tensor([0, 3, 5, 9], dtype=torch.int32), 9)[0, 0]
    windows = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert mask.tolist() == [[a == b for b in windows] for a in windows]


def test_masked_tower_equals_the_per_window_tower_in_one_call_per_block(tiny_editor, photo, monkeypatch):
    pipe = tiny_editor.pipe
    patched = copy.deepcopy(pipe.text_encoder)
    depth = len(patched.model.visual.blocks)
    assert vision_attention.install(patched) == depth
    assert vision_attention.install(patched) == 0  # once only
    images = stages.prompt_images(pipe, [photo])
    inputs = pipe.processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=images, return_tensors="pt")
    grid = inputs["image_grid_thw"]
    windows = (grid[0, 1] // 8) * (grid[0, 2] // 8)  # 112-px windows of 14-px patches, rounded down
    assert windows >= 4  # the photo spans several windows: the mask matters
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    with torch.no_grad():
        want = pipe.text_encoder.model.visual(inputs["pixel_values"], grid_thw=grid)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        got = patched.model.visual(inputs["pixel_values"], grid_thw=grid)
    want, got = (getattr(o, "pooler_output", o) for o in (want, got))
    assert len(calls) == depth  # one call per block, not one per window
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    vision_attention.uninstall(patched)
    assert type(patched.model.visual.blocks[0].attn) is type(pipe.text_encoder.model.visual.blocks[0].attn)


def test_an_edit_with_the_masked_tower_stays_within_its_tolerance(tiny_editor, photo):
    request = small_request(photo, seed=4, steps=2)
    encoder = tiny_editor.pipe.text_encoder
    install, uninstall = vision_attention.install, vision_attention.uninstall
    assert_installed_option_within("vision-attention-masked", tiny_editor, request, encoder, install, uninstall)
