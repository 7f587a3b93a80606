"""Trajectory early exit and step caching: the stop rule, the counts, and that hooks never outlive a request."""

import pytest
import torch
from conftest import small_request

from qie import InvalidRequestError
from qie.speed.early_exit import TrajectoryEarlyExit, step_cache


def run_observer(observer, clean_latents, sigma=0.5):
    """Feed x0 predictions in: latents = x0 + sigma * v with v = 1, so x0 is recovered exactly."""
    v = torch.ones(1, 4, 8)
    for i, clean in enumerate(clean_latents):
        final = observer.after_step(i, clean + sigma * v, v, sigma)
        if final is not None:
            return i, final
    return None, None


def test_stops_after_patience_calm_steps_and_returns_x0():
    base = torch.randn(1, 4, 8)
    # changes: 1.0 (big), then 0.001, 0.001 -> calm twice at step 3
    xs = [base, base * 2, base * 2.002, base * 2.004, base * 3, base * 3]
    observer = TrajectoryEarlyExit(threshold=0.01, patience=2, total_steps=6)
    stop, final = run_observer(observer, xs)
    assert stop == 3 and observer.steps_run == 4 and observer.steps_skipped == 2
    torch.testing.assert_close(final, xs[3])


def test_a_jump_resets_patience_and_the_last_step_is_never_cut():
    base = torch.randn(1, 4, 8)
    xs = [base, base * 1.0001, base * 5, base * 5.0001]
    observer = TrajectoryEarlyExit(threshold=0.01, patience=2, total_steps=4)
    stop, _ = run_observer(observer, xs)
    assert stop is None and observer.steps_run == 4 and observer.steps_skipped == 0
    assert observer.changes[0] < 0.01 < observer.changes[1]


def test_early_exit_in_an_edit(tiny_editor, photo):
    result = tiny_editor.edit(small_request(photo, steps=4, early_exit_threshold=1.0, early_exit_patience=1))
    assert (result.steps_run, result.steps_skipped) == (2, 2)
    assert "stopped after 2 of 4 steps" in result.notes[0]
    never = tiny_editor.edit(small_request(photo, steps=3, early_exit_threshold=0.0))
    assert (never.steps_run, never.steps_skipped) == (3, 0)


def test_fbcache_with_zero_threshold_changes_nothing(tiny_editor, photo):
    plain = tiny_editor.edit(small_request(photo, steps=3))
    cached = tiny_editor.edit(small_request(photo, steps=3, step_cache="fbcache", step_cache_threshold=0.0))
    assert cached.cached_calls == 0
    assert "0 of 6 transformer calls" in cached.notes[0]
    assert list(cached.image.getdata()) == list(plain.image.getdata())
    assert tiny_editor.pipe.transformer._cache_config is None


def test_cache_is_disabled_after_an_error(tiny_editor):
    transformer = tiny_editor.pipe.transformer
    with pytest.raises(RuntimeError), step_cache(transformer, "taylorseer", threshold=0.05, interval=2):
        assert transformer._cache_config is not None
        raise RuntimeError("boom")
    assert transformer._cache_config is None


def test_speed_options_are_validated(photo):
    for bad in (
        {"step_cache": "teacache"},
        {"attention_quant": "int4"},
        {"mode": "turbo"},
        {"early_exit_threshold": 2},
        {"early_exit_patience": 0},
        {"step_cache_threshold": -0.1},
    ):
        name = next(iter(bad))
        with pytest.raises(InvalidRequestError, match=f"^{name}="):
            small_request(photo, **bad)
