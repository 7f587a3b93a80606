"""Out of memory and other faults mid-edit: reported or recovered, references dropped, editor usable."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import torch
from conftest import clone_editor, small_request

from qie import CancelledError, Editor, InvalidRequestError, ResourceError
from qie.core import faults
from qie.core.load_options import LoadOptions
from qie.settings import Settings


def test_oom_mid_denoise_is_reported_with_numbers_and_references_dropped(tiny_editor, photo):
    clean = tiny_editor.edit(small_request(photo, steps=3)).image
    with faults.inject(tiny_editor.pipe.transformer, after=1) as fault, pytest.raises(ResourceError) as info:
        tiny_editor.edit(small_request(photo, steps=3))
    message = str(info.value)
    assert "out of memory editing 128x96 with 1 image(s), 3 steps, CFG on, plan 'resident'" in message
    assert "lower max_side" in message
    assert (fault.calls, fault.raised) == (2, 1)  # the second transformer call: mid-denoise
    gc.collect()
    assert fault.inputs["hidden_states"]() is None  # the failed edit's latents are gone
    assert all(ref() is None for ref in fault.inputs.values())  # and the caches were cleared
    assert not tiny_editor.lock.locked()
    again = tiny_editor.edit(small_request(photo, steps=3)).image
    assert np.array_equal(np.asarray(clean), np.asarray(again))


@pytest.mark.slow
def test_oom_steps_down_and_retries(tiny_editor, photo):
    editor = clone_editor(tiny_editor)
    stepped = []

    def step_down() -> bool:  # on CPU there is no smaller plan; stand in for the CUDA step-down
        stepped.append(editor.plan.name)
        return len(stepped) == 1

    editor.step_down = step_down
    with faults.inject(editor.pipe.transformer, after=1):
        result = editor.edit(small_request(photo, steps=2))
    assert stepped == ["resident"]
    assert result.notes[-1] == "out of memory with plan resident; stepped down to resident"
    with faults.inject(editor.pipe.transformer, times=5), pytest.raises(ResourceError, match="No smaller memory plan"):
        editor.edit(small_request(photo, steps=2))  # failed again after one step-down: reported
    assert stepped == ["resident", "resident"]


def test_step_down_on_cpu_has_nowhere_to_go(tiny_editor):
    assert clone_editor(tiny_editor).step_down() is False


def test_unexpected_fault_propagates_and_editor_goes_on(tiny_editor, photo):
    with faults.inject(tiny_editor.pipe.text_encoder, error="runtime"), pytest.raises(RuntimeError, match="injected"):
        tiny_editor.edit(small_request(photo, prompt="a prompt no other test encodes", steps=2))
    assert tiny_editor.edit(small_request(photo, steps=2)).image.size == (128, 96)


def test_fault_from_environment(tiny_editor, photo):
    spec = LoadOptions.from_env(Settings.from_env({"QIE_FAULT": "transformer:oom:0:1"})).fault
    editor = clone_editor(tiny_editor, fault=faults.arm_spec(tiny_editor.pipe, spec))
    try:
        with pytest.raises(ResourceError):
            editor.edit(small_request(photo, steps=2))
        assert editor.edit(small_request(photo, steps=2)).steps_run == 2  # it fired once
    finally:
        editor.fault.remove()
    with pytest.raises(ValueError, match="not a component"):
        faults.arm_spec(tiny_editor.pipe, "nothing:oom")
    with pytest.raises(InvalidRequestError, match="QIE_FAULT='transformer:boom' is not valid"):
        Settings.from_env({"QIE_FAULT": "transformer:boom"})


def test_cancel_from_another_thread_mid_run(tiny_editor, photo):
    started, cancel, outcome = threading.Event(), threading.Event(), []

    def run():
        try:
            tiny_editor.edit(small_request(photo, steps=40), on_step=lambda i, n: started.set(), cancel=cancel)
        except CancelledError as exc:
            outcome.append(str(exc))

    worker = threading.Thread(target=run)
    worker.start()
    assert started.wait(60)
    cancel.set()
    worker.join(60)
    assert outcome and "cancelled after" in outcome[0]
    assert tiny_editor.edit(small_request(photo, steps=2)).image.size == (128, 96)


@pytest.mark.gpu
def test_gpu_oom_steps_down_and_memory_is_released():
    from PIL import Image

    request = small_request(Image.new("RGB", (128, 96), (90, 120, 150)), steps=2)
    resident = Editor.load("tiny", device="cuda", plan="resident")
    with faults.inject(resident.pipe.transformer, after=1):
        result = resident.edit(request)
    assert resident.plan.name != "resident" and f"stepped down to {resident.plan.name}" in result.notes[-1]

    offload = Editor.load("tiny", device="cuda", plan="model-offload")
    offload.edit(request)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with faults.inject(offload.pipe.transformer, after=1, times=10), pytest.raises(ResourceError, match="GiB free of"):
        offload.edit(request)  # the last resort: nothing to step down to, reported with the numbers
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before  # nothing of the failed edit stays on the GPU
    assert offload.edit(request).image.size == (128, 96)
