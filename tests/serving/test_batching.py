"""Serving's batcher groups queued requests by `batch_key` and edits each group through `Editor.edit_batch`."""

import logging

from conftest import small_request, transformer_batch_sizes

from qie import InvalidRequestError
from qie.serving.batching import run_grouped


def test_run_grouped_batches_with_speed_options(tiny_editor, photo):
    # Step cache and early exit used to send requests one at a time; now they share the batch.
    options = {"steps": 4, "step_cache": "fbcache", "step_cache_threshold": 1.0, "early_exit_threshold": 1.0}
    requests = [small_request(photo, seed=s, early_exit_patience=1, **options) for s in (1, 2)]
    requests.append(small_request(photo, seed=3, steps=2))  # another key: its own group
    with transformer_batch_sizes(tiny_editor) as seen:
        results = run_grouped(tiny_editor, requests, max_batch=4)
    assert 2 in seen and [r.seed for r in results] == [1, 2, 3]
    for result in results[:2]:
        assert result.notes[0] == "batch of 2"
        assert result.cached_calls > 0 and result.steps_run < 4
    assert not any("batch" in note for note in results[2].notes)


def test_run_grouped_isolates_a_failing_request(tiny_editor, photo, caplog, monkeypatch):
    good = small_request(photo, seed=1, steps=2)
    bad = small_request(photo, seed=2, steps=2)
    other = small_request(photo, seed=3, steps=3)
    real_edit, real_batch = tiny_editor.edit, tiny_editor.edit_batch

    def edit_batch_fails(requests, **kw):
        if len(requests) > 1:
            raise InvalidRequestError("prompt", "<too long>", "shorten it")
        return real_batch(requests, **kw)

    def edit(request, **kw):
        if request is bad:
            raise InvalidRequestError("prompt", "<too long>", "shorten it")
        return real_edit(request, **kw)

    monkeypatch.setattr(tiny_editor, "edit_batch", edit_batch_fails)
    monkeypatch.setattr(tiny_editor, "edit", edit)
    with caplog.at_level(logging.WARNING, logger="qie.serving.batching"):
        results = run_grouped(tiny_editor, [good, other, bad], max_batch=4)
    assert isinstance(results[2], InvalidRequestError)
    assert results[0].seed == 1 and results[1].seed == 3
    # run alone: no batch note
    assert not any("batch" in note for r in results[:2] for note in r.notes)
    assert "a batch of 2 failed" in caplog.text


def test_a_failing_request_alone_comes_back_as_its_error(tiny_editor, photo, monkeypatch):
    def edit_batch(requests, **kw):
        raise InvalidRequestError("prompt", "<too long>", "shorten it")

    monkeypatch.setattr(tiny_editor, "edit_batch", edit_batch)
    [result] = run_grouped(tiny_editor, [small_request(photo)], max_batch=4)
    assert isinstance(result, InvalidRequestError)
