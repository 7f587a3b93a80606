"""Batched CFG: both guidance branches in one transformer call give the two-call image."""

import dataclasses
import logging

import pytest
import torch
from conftest import small_request, transformer_batch_sizes
from oracle import assert_matches_reference

from qie import InvalidRequestError
from qie.core.stages import PromptEmbeds, stack_prompts


@pytest.fixture()
def batch_sizes(tiny_editor):
    """The batch size of every transformer call made while the test runs."""
    with transformer_batch_sizes(tiny_editor) as seen:
        yield seen


def test_batched_cfg_is_one_call_per_step_within_its_tolerance(tiny_editor, photo, batch_sizes):
    request = small_request(photo, seed=3, steps=3, batch_cfg=True)
    two_calls = tiny_editor.edit(dataclasses.replace(request, batch_cfg=False)).image
    assert batch_sizes == [1] * 6
    batch_sizes.clear()
    batched = tiny_editor.edit(request).image
    assert batch_sizes == [2] * 3
    assert_matches_reference("batched-cfg", batched, two_calls)


def test_without_cfg_or_where_it_does_not_pay_nothing_is_batched(tiny_editor, photo, batch_sizes):
    tiny_editor.edit(small_request(photo, steps=2, true_cfg_scale=1.0, batch_cfg=True))
    assert batch_sizes == [1, 1]
    batch_sizes.clear()
    tiny_editor.edit(small_request(photo, steps=2))  # batch_cfg=None: the cost model decides; no stream plan here
    assert batch_sizes == [1] * 4


def test_out_of_memory_falls_back_to_two_calls(tiny_editor, photo, caplog, monkeypatch):
    request = small_request(photo, seed=4, steps=2, batch_cfg=True)
    two_calls = tiny_editor.edit(dataclasses.replace(request, batch_cfg=False)).image
    original = tiny_editor.pipe.transformer.forward

    def no_room_for_two(*args, **kwargs):
        if kwargs["hidden_states"].shape[0] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(*args, **kwargs)

    monkeypatch.setattr(tiny_editor.pipe.transformer, "forward", no_room_for_two)
    monkeypatch.setattr(tiny_editor, "batched_cfg", type(tiny_editor.batched_cfg)())
    with caplog.at_level(logging.WARNING, logger="qie.core.stages"):
        image = tiny_editor.edit(request).image
    assert tiny_editor.batched_cfg.two_calls
    assert "running the two CFG branches as separate calls" in caplog.text
    assert_matches_reference("default-no-fixes", image, two_calls)


def test_stack_prompts_pads_the_shorter_batch_and_masks_it():
    cond = PromptEmbeds(embeds=torch.ones(1, 5, 4), mask=None)
    uncond = PromptEmbeds(embeds=torch.full((1, 2, 4), 2.0), mask=None)
    both = stack_prompts([cond, uncond])
    assert both.embeds.shape == (2, 5, 4)
    assert both.mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert both.embeds[1, 2:].abs().sum() == 0 and torch.equal(both.embeds[1, :2], uncond.embeds[0])
    assert stack_prompts([cond, cond]).mask is None
    padded = PromptEmbeds(embeds=torch.ones(2, 3, 4), mask=torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert stack_prompts([padded, cond]).mask.tolist()[:2] == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]


def test_batch_cfg_must_be_a_bool(photo):
    with pytest.raises(InvalidRequestError, match="batch_cfg"):
        small_request(photo, batch_cfg="yes")
