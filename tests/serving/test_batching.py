"""Several requests in one denoising batch give the images of one edit at a time."""

import pytest
from conftest import small_request
from oracle import assert_matches_reference
from PIL import Image

from qie import InvalidRequestError
from qie.serving.batching import batch_key, edit_batch, group_by_key, pad_prompts


def test_batch_of_two_matches_single_edits(tiny_editor, photo):
    flipped = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # Prompts of different lengths: the batch pads one of them and passes a mask.
    a = small_request(photo, seed=1)
    b = small_request(flipped, seed=2, prompt="turn it into an oil painting of an old mug on a wooden table")
    singles = [tiny_editor.edit(r).image for r in (a, b)]
    seen = []
    original = tiny_editor.pipe.transformer.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["hidden_states"].shape[0])
        return original(*args, **kwargs)

    tiny_editor.pipe.transformer.forward = spy
    try:
        results = edit_batch(tiny_editor, [a, b])
    finally:
        del tiny_editor.pipe.transformer.forward
    assert seen == [2] * (2 * a.steps)  # one call per step and CFG branch, for both images
    assert [r.notes for r in results] == [("batch of 2",)] * 2
    assert [r.seed for r in results] == [1, 2]
    for result, single in zip(results, singles, strict=True):
        assert_matches_reference("batching", result.image, single)


def test_prompt_padding_and_mask():
    import torch

    from qie.core.stages import PromptEmbeds

    short = PromptEmbeds(embeds=torch.ones(1, 3, 4), mask=None)
    long = PromptEmbeds(embeds=torch.ones(1, 5, 4), mask=None)
    padded = pad_prompts([short, long])
    assert padded.embeds.shape == (2, 5, 4)
    assert padded.mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert padded.embeds[0, 3:].abs().sum() == 0
    assert pad_prompts([long, long]).mask is None


def test_batch_key_and_grouping(photo):
    a = small_request(photo, seed=1)
    b = small_request(photo, seed=2, prompt="something else")
    other_steps = small_request(photo, steps=2)
    no_cfg = small_request(photo, true_cfg_scale=1.0)
    square = small_request(photo.crop((0, 0, 200, 200)))
    assert batch_key(a) == batch_key(b)
    assert len({batch_key(r) for r in (a, other_steps, no_cfg, square)}) == 4
    assert group_by_key([a, other_steps, b, a, b], max_batch=2) == [[0, 2], [3, 4], [1]]


def test_mixed_shapes_and_engine_options_refused(tiny_editor, photo):
    with pytest.raises(InvalidRequestError, match="batch_key"):
        edit_batch(tiny_editor, [small_request(photo), small_request(photo, steps=2)])
    with_options = small_request(photo, options={"step_cache": 0.1})
    with pytest.raises(InvalidRequestError, match="one at a time"):
        edit_batch(tiny_editor, [with_options, with_options])


def test_run_grouped_isolates_a_failing_request(tiny_editor, photo, caplog, monkeypatch):
    import logging

    from qie.serving import batching

    good = small_request(photo, seed=1, steps=2)
    bad = small_request(photo, seed=2, steps=2)
    other = small_request(photo, seed=3, steps=3)
    real_edit, real_batch = tiny_editor.edit, batching.edit_batch

    def edit_batch_fails(editor, requests, **kw):
        if len(requests) > 1:
            raise InvalidRequestError("prompt", "<too long>", "shorten it")
        return real_batch(editor, requests)

    def edit(request, **kw):
        if request is bad:
            raise InvalidRequestError("prompt", "<too long>", "shorten it")
        return real_edit(request, **kw)

    monkeypatch.setattr(batching, "edit_batch", edit_batch_fails)
    monkeypatch.setattr(tiny_editor, "edit", edit)
    with caplog.at_level(logging.WARNING, logger="qie.serving.batching"):
        results = batching.run_grouped(tiny_editor, [good, other, bad], max_batch=4)
    assert isinstance(results[2], InvalidRequestError)
    assert results[0].seed == 1 and results[1].seed == 3
    # run alone, through Editor.edit: no batch note
    assert not any("batch" in note for r in results[:2] for note in r.notes)
    assert "a batch of 2 failed" in caplog.text


def test_requests_with_engine_fields_are_not_batched(photo):
    from qie.serving.batching import batch_key, engine_options

    plain = small_request(photo)
    assert engine_options(plain) == {}
    tiled = small_request(photo, tile_size=64)
    boxed = small_request(photo, box=(0, 0, 50, 50))
    assert engine_options(tiled) == {"tile_size": 64}
    assert "box" in engine_options(boxed)
    assert batch_key(plain) != batch_key(tiled)
