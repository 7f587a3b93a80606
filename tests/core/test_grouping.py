"""One key decides which requests share a denoising batch; per-image fields never split a batch."""

import dataclasses

from conftest import small_request

from qie import EditRequest
from qie.core.grouping import batch_key, group_by_key, shared_fields
from qie.core.stages import PromptEmbeds, pad_prompts

# A value away from the default for each field, to see which fields split a batch.
CHANGED = {
    "negative_prompt": "blurry",
    "true_cfg_scale": 3.0,
    "seed": 9,
    "max_side": 200,
    "area": 512 * 512,
    "resize_to_input": True,
    "tile_size": 64,
    "tile_overlap": 8,
    "box": (0, 0, 20, 20),
    "mask_feather": 0,
    "steps": 2,
    "width": 96,
    "height": 64,
    "condition_area": "model",
    "mode": "quality",
    "attention_quant": "int8",
    "step_cache": "fbcache",
    "step_cache_threshold": 0.2,
    "step_cache_interval": 4,
    "early_exit_threshold": 0.1,
    "early_exit_patience": 3,
    "batch_cfg": True,
}


def test_batch_key_and_grouping(photo):
    a = small_request(photo, seed=1)
    b = small_request(photo, seed=2, prompt="something else")
    other_steps = small_request(photo, steps=2)
    no_cfg = small_request(photo, true_cfg_scale=1.0)
    square = small_request(photo.crop((0, 0, 200, 200)))
    assert batch_key(a) == batch_key(b)
    assert len({batch_key(r) for r in (a, other_steps, no_cfg, square)}) == 4
    assert group_by_key([a, other_steps, b, a, b], max_batch=2) == [[0, 2], [3, 4], [1]]


def test_every_shared_field_splits_a_batch_and_per_image_fields_do_not(photo):
    base = small_request(photo)
    assert set(shared_fields()) == {
        "steps",
        "height",
        "width",
        "condition_area",
        "mode",
        "attention_quant",
        "step_cache",
        "step_cache_threshold",
        "step_cache_interval",
        "early_exit_threshold",
        "early_exit_patience",
        "batch_cfg",
    }
    for f in dataclasses.fields(EditRequest):
        if f.name in ("images", "prompt", "mask"):
            continue
        assert f.name in CHANGED, f"EditRequest.{f.name}: add a changed value to CHANGED"
        changed = dataclasses.replace(base, **{f.name: CHANGED[f.name]})
        if f.name in ("max_side", "area"):  # settled into width and height, which are shared
            changed = dataclasses.replace(changed, width=base.width, height=base.height)
            assert (changed.width, changed.height) == (base.width, base.height)
        split = batch_key(changed) != batch_key(base)
        assert split == (f.name in shared_fields() or f.name == "true_cfg_scale"), f.name


def test_prompt_padding_and_mask():
    import torch

    short = PromptEmbeds(embeds=torch.ones(1, 3, 4), mask=None)
    long = PromptEmbeds(embeds=torch.ones(1, 5, 4), mask=None)
    padded = pad_prompts([short, long])
    assert padded.embeds.shape == (2, 5, 4)
    assert padded.mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert padded.embeds[0, 3:].abs().sum() == 0
    assert pad_prompts([long, long]).mask is None
    assert pad_prompts([short]) is short
