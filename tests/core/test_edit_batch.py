"""`Editor.edit_batch`: several requests in one denoising loop, with every option of a single edit."""

import threading

import pytest
from conftest import small_request, transformer_batch_sizes
from oracle import assert_matches_reference
from PIL import Image

from qie import CancelledError, InvalidRequestError


def batch_of(editor, requests, **kw):
    with transformer_batch_sizes(editor) as seen:
        return editor.edit_batch(requests, **kw), seen


def two_requests(photo, **kw):
    flipped = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # Prompts of different lengths: the batch pads one of them and passes a mask.
    long = "turn it into an oil painting of an old mug on a wooden table"
    return [small_request(photo, seed=1, **kw), small_request(flipped, seed=2, prompt=long, **kw)]


def test_batch_of_two_matches_single_edits(tiny_editor, photo):
    requests = two_requests(photo)
    singles = [tiny_editor.edit(r).image for r in requests]
    results, seen = batch_of(tiny_editor, requests)
    assert seen == [2] * (2 * requests[0].steps)  # one call per step and CFG branch, for both images
    # The singles filled the prompt/condition cache; the batch reads it.
    assert [r.notes for r in results] == [("batch of 2", "prompt cache hit", "condition cache hit")] * 2
    assert [r.seed for r in results] == [1, 2]
    assert all(r.request_id for r in results) and results[0].request_id != results[1].request_id
    for result, single in zip(results, singles, strict=True):
        assert_matches_reference("batching", result.image, single)


def test_a_batch_of_one_is_the_single_edit(tiny_editor, photo):
    request = small_request(photo)
    [batched] = tiny_editor.edit_batch([request])
    assert list(batched.image.getdata()) == list(tiny_editor.edit(request).image.getdata())
    assert not any("batch" in note for note in batched.notes) and tiny_editor.edit_batch([]) == []


def test_batched_requests_honour_step_cache_and_early_exit(tiny_editor, photo):
    options = {"steps": 4, "step_cache": "fbcache", "step_cache_threshold": 1.0, "early_exit_threshold": 1.0}
    requests = two_requests(photo, early_exit_patience=1, **options)
    singles = [tiny_editor.edit(r) for r in requests]
    results, seen = batch_of(tiny_editor, requests)
    assert set(seen) == {2}  # really one batch
    for result, single in zip(results, singles, strict=True):
        assert result.cached_calls > 0 and result.cached_calls == single.cached_calls
        assert (result.steps_run, result.steps_skipped) == (single.steps_run, single.steps_skipped) == (3, 1)
        assert "early exit: stopped after 3 of 4 steps" in result.notes
        assert any(note.startswith("step_cache=fbcache") for note in result.notes)
        assert_matches_reference("batching", result.image, single.image)
    assert tiny_editor.pipe.transformer._cache_config is None  # hooks removed after the batch


@pytest.mark.slow
def test_per_image_options_apply_in_a_batch(tiny_editor, photo):
    a = small_request(photo, seed=1, tile_size=64, tile_overlap=16)
    b = small_request(photo, seed=2, box=(10, 10, 60, 60), resize_to_input=True)
    results, seen = batch_of(tiny_editor, [a, b])
    assert set(seen) == {2}
    assert "VAE tiled (64 px tiles, 16 px overlap)" in results[0].notes
    assert "kept the original outside the box" in results[1].notes
    assert results[1].image.size == photo.size
    for result, request in zip(results, (a, b), strict=True):
        assert_matches_reference("batching", result.image, tiny_editor.edit(request).image)


def test_cancel_stops_the_whole_batch(tiny_editor, photo):
    cancel = threading.Event()
    steps = []

    def stop_after_first(i, n):
        steps.append((i, n))
        cancel.set()

    requests = two_requests(photo, steps=5, step_cache="fbcache")
    with pytest.raises(CancelledError, match="after 1 of 5 steps"):
        tiny_editor.edit_batch(requests, on_step=stop_after_first, cancel=cancel)
    assert steps == [(1, 5)]  # progress counts the batch's steps once
    assert not tiny_editor.lock.locked()
    assert tiny_editor.pipe.transformer._cache_config is None
    assert len(tiny_editor.edit_batch(two_requests(photo, steps=2))) == 2


def test_requests_that_cannot_share_a_batch_are_refused_by_name(tiny_editor, photo):
    with pytest.raises(InvalidRequestError, match=r"^requests\[1\]='<steps differ from requests\[0\]>'"):
        tiny_editor.edit_batch([small_request(photo), small_request(photo, steps=2)])
    with pytest.raises(InvalidRequestError, match="step_cache, step_cache_threshold differ"):
        tiny_editor.edit_batch(
            [small_request(photo), small_request(photo, step_cache="fbcache", step_cache_threshold=0.2)]
        )
