"""Dynamo's guards skipped after a loop's first step: only for compiled blocks, only while one thread runs."""

import threading

import pytest
import torch
from PIL import Image
from torch._dynamo import eval_frame
from torch._dynamo.utils import counters

from qie import Editor
from qie.core.request import EditRequest
from qie.speed import guards
from qie.speed.compile import uncompile_blocks


def skipping() -> bool:
    return eval_frame._stance.skip_guard_eval_unsafe


@pytest.fixture()
def compiled():
    """The tiny editor with its blocks compiled in place (the eager backend: Dynamo's guards, no Inductor)."""
    editor = Editor.load("tiny")
    torch._dynamo.reset()
    editor.pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    yield editor
    uncompile_blocks(editor.pipe.transformer)


def test_steps_after_the_first_skip_guards_for_compiled_blocks(compiled):
    assert guards.compiled_blocks(compiled.pipe.transformer)
    seen = []
    with guards.steady_loop(compiled.pipe.transformer) as step:
        for i in range(3):
            with step(i) as skipped:
                seen.append((skipped, skipping()))
    assert seen == [(False, False), (True, True), (True, True)]
    assert not skipping()  # the stance is back after each step


def test_eager_blocks_keep_every_guard(tiny_editor):
    assert not guards.compiled_blocks(tiny_editor.pipe.transformer)
    with guards.steady_loop(tiny_editor.pipe.transformer) as step, step(1) as skipped:
        assert not skipped and not skipping()


def test_no_step_skips_while_another_thread_runs_an_edit(compiled):
    started, finish = threading.Event(), threading.Event()

    def other_edit():
        with guards.running():
            started.set()
            finish.wait(10)

    other = threading.Thread(target=other_edit)
    other.start()
    started.wait(10)
    try:
        with guards.steady_loop(compiled.pipe.transformer) as step, step(1) as skipped:
            assert not skipped and not skipping()
    finally:
        finish.set()
        other.join()
    with guards.steady_loop(compiled.pipe.transformer) as step, step(1) as skipped:
        assert skipped  # alone again


def test_work_that_starts_during_a_skipping_step_waits_for_it(compiled):
    registered = threading.Event()

    def start_work():
        with guards.running():
            registered.set()

    with guards.steady_loop(compiled.pipe.transformer) as step:
        with step(1) as skipped:
            assert skipped
            other = threading.Thread(target=start_work)
            other.start()
            assert not registered.wait(0.3)  # held at the gate while guards are skipped
        other.join(10)
        assert registered.is_set()


def test_edits_with_skipped_guards_equal_edits_with_every_guard(compiled, monkeypatch):
    """Same pixels either way, at a first size and then at a new size and prompt length (whose first
    step must see every guard), and no extra graph."""
    photo = Image.new("RGB", (256, 256), (30, 60, 90))
    edits = [
        EditRequest(images=[photo], prompt="add a red price tag", steps=3, seed=1, width=256, height=256),
        EditRequest(images=[photo], prompt="remove the watermark, bottom left", steps=3, seed=2, width=192, height=256),
    ]
    calls = []  # per transformer call: whether guards were being skipped
    hook = compiled.pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(skipping()))
    try:
        skipped = [compiled.edit(request).image for request in edits]
        graphs = counters["stats"]["unique_graphs"]
        # each edit: 3 steps of two calls (CFG), guards skipped after the first step
        assert calls == [False, False, True, True, True, True] * 2
        monkeypatch.setattr(guards, "_step", guards._guarded)
        calls.clear()
        guarded = [compiled.edit(request).image for request in edits]
        assert not any(calls)
    finally:
        hook.remove()
    assert counters["stats"]["unique_graphs"] == graphs
    for a, b in zip(skipped, guarded, strict=True):
        assert a.tobytes() == b.tobytes()
