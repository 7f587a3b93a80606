"""Trajectory early exit and step caching: the stop rule, the counts, and that hooks never outlive a request."""

import contextlib
import sys
from pathlib import Path

import pytest
import torch
from conftest import small_request

from qie import InvalidRequestError
from qie.speed.early_exit import HostScalar, TrajectoryEarlyExit, step_cache


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
    # changes: 1.0 (big), then 0.001, 0.001 -> calm twice at step 3, read (no host sync) at step 4
    xs = [base, base * 2, base * 2.002, base * 2.004, base * 2.005, base * 3, base * 3]
    observer = TrajectoryEarlyExit(threshold=0.01, patience=2, total_steps=7)
    stop, final = run_observer(observer, xs)
    assert stop == 4 and observer.steps_run == 5 and observer.steps_skipped == 2
    torch.testing.assert_close(final, xs[4])  # the newest x0
    assert observer.changes == pytest.approx([1.0, 0.001, 0.001], rel=1e-2)  # step 4's change never needed


def test_a_jump_resets_patience_and_the_last_step_is_never_cut():
    base = torch.randn(1, 4, 8)
    xs = [base, base * 1.0001, base * 5, base * 5.0001]
    observer = TrajectoryEarlyExit(threshold=0.01, patience=2, total_steps=4)
    stop, _ = run_observer(observer, xs)
    assert stop is None and observer.steps_run == 4 and observer.steps_skipped == 0
    assert observer.changes[0] < 0.01 < observer.changes[1]


def test_early_exit_in_an_edit(tiny_editor, photo):
    result = tiny_editor.edit(small_request(photo, steps=4, early_exit_threshold=1.0, early_exit_patience=1))
    assert (result.steps_run, result.steps_skipped) == (3, 1)  # step 1's change, read at step 2, settles it
    assert "stopped after 3 of 4 steps" in result.notes[0]
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


HOST_READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "cpu", "numpy")
LOOP_FUNCTIONS = {"denoise", "guided_prediction", "_predict", "cfg_combine", "after_step", "observe", "finish"}


@contextlib.contextmanager
def host_reads():
    """Record (method, calling function) of every tensor-to-host read made from qie's own code."""
    import qie

    root = str(Path(qie.__file__).parent)
    calls: list[tuple[str, str]] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def spy(name, method):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(root):
                calls.append((name, caller.co_name))
            return method(self, *args, **kwargs)

        return read

    for name, method in originals.items():
        setattr(torch.Tensor, name, spy(name, method))
    try:
        yield calls
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("early_exit", [False, True])
def test_the_denoise_loop_reads_nothing_back_to_the_host(tiny_editor, photo, early_exit):
    """On a GPU each read of a device tensor waits for all queued work: the loop has none but early exit's,
    which reads a value copied without waiting one step earlier (`HostScalar`)."""
    options = {"early_exit_threshold": 0.0} if early_exit else {}  # 0: never stops, every step observed
    with host_reads() as calls:
        tiny_editor.edit(small_request(photo, steps=5, **options))
    in_loop = [call for call in calls if call[1] in LOOP_FUNCTIONS or call[1] == "value"]
    expected = [("tolist", "denoise")] + [("__float__", "value")] * 3 if early_exit else []
    assert in_loop == expected  # sigmas once before the loop; changes of steps 1-3, each read a step later


def test_a_host_scalar_on_the_cpu_is_the_value():
    assert HostScalar(torch.tensor(0.25)).value() == 0.25


@pytest.mark.gpu
def test_no_synchronizing_cuda_call_from_qie_in_the_loop(photo, monkeypatch):
    """On a GPU: CUDA's sync debug mode warns at every synchronizing call; none may come from qie's loop."""
    import warnings

    from qie import Editor
    from qie.core import stages

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    editor = Editor.load("tiny", device="cuda", dtype=torch.bfloat16)
    denoise = stages.denoise

    def watched(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            return denoise(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(stages, "denoise", watched)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        editor.edit(small_request(photo, steps=5, early_exit_threshold=0.0))
    from_qie = [f"{w.filename}:{w.lineno}" for w in caught if "/qie/" in w.filename and "synchroniz" in str(w.message)]
    assert from_qie == []
