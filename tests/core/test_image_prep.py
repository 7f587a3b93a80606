"""The text encoder's small images and processor tensors made on a worker thread: the same ones, from
another thread, and nothing of an edit left running on the worker when it returns."""

import threading
import time

import numpy as np
import pytest
import torch
from conftest import small_request
from PIL import Image

from qie import InvalidRequestError
from qie.core import encode_cache, image_prep, stages


def _on_worker(name: str) -> bool:
    return name.startswith("qie-image-prep") and name != threading.current_thread().name


def test_prompt_prep_images_equal_the_inline_ones_and_come_from_another_thread(tiny_editor, photo, monkeypatch):
    threads: list[str] = []
    inline = stages.prompt_images

    def spy(pipe, images):
        threads.append(threading.current_thread().name)
        return inline(pipe, images)

    monkeypatch.setattr(stages, "prompt_images", spy)
    images = [photo, photo.rotate(90, expand=True)]
    prep = image_prep.PromptPrep(tiny_editor.pipe, images)
    got, want = prep.images(), inline(tiny_editor.pipe, images)
    assert [img.size for img in got] == [img.size for img in want]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, want, strict=True))
    assert threads and _on_worker(threads[0])


def test_prompt_prep_inputs_equal_the_inline_ones_and_come_from_another_thread(tiny_editor, photo, monkeypatch):
    threads: list[str] = []
    inline = stages.prompt_inputs

    def spy(pipe, prompt, images):
        threads.append(threading.current_thread().name)
        return inline(pipe, prompt, images)

    monkeypatch.setattr(stages, "prompt_inputs", spy)
    prep = image_prep.PromptPrep(tiny_editor.pipe, [photo])
    prep.start(["make it blue", "make it red"])
    got = prep.inputs("make it red")
    want = inline(tiny_editor.pipe, "make it red", stages.prompt_images(tiny_editor.pipe, [photo]))
    assert set(got.keys()) == set(want.keys())
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert prep.inputs("make it red") is None  # handed out once
    assert prep.inputs("not started") is None
    prep.settle()
    assert len(threads) == 2 and all(_on_worker(t) for t in threads)


def test_a_resize_error_reaches_the_caller_when_it_asks_for_the_images(tiny_editor, monkeypatch):
    def broken(pipe, images):
        raise OSError("truncated image")

    monkeypatch.setattr(stages, "prompt_images", broken)
    prep = image_prep.PromptPrep(tiny_editor.pipe, [Image.new("RGB", (64, 64))])
    prep.start(["a prompt"])
    prep.settle()  # waits, raises nothing
    with pytest.raises(OSError, match="truncated image"):
        prep.images()
    with pytest.raises(OSError, match="truncated image"):
        prep.inputs("a prompt")


def test_an_over_long_prompt_is_refused_by_the_edit_when_the_worker_counts_its_tokens(tiny_editor, photo):
    tiny_editor.cache.clear()
    with pytest.raises(InvalidRequestError, match="at most 1024 tokens"):
        tiny_editor.edit(small_request(photo, steps=2, prompt="水" * 1500))


def test_an_edit_encodes_its_prompt_with_the_workers_images_and_tensors(tiny_editor, photo, monkeypatch):
    made: list[tuple[str, object]] = []
    inline = stages.prompt_inputs

    def inputs_spy(pipe, prompt, images):
        made.append((threading.current_thread().name, inline(pipe, prompt, images)))
        return made[-1][1]

    seen: list[object] = []
    encode = stages.encode_prompt

    def encode_spy(pipe, prompt, images, **kw):
        seen.append(kw.get("inputs"))
        return encode(pipe, prompt, images, **kw)

    monkeypatch.setattr(stages, "prompt_inputs", inputs_spy)
    monkeypatch.setattr(stages, "encode_prompt", encode_spy)
    tiny_editor.cache.clear()
    tiny_editor.edit(small_request(photo, steps=2, prompt="a prompt only this test uses"))
    assert len(made) == len(seen) == 2  # the prompt and the negative prompt (CFG)
    assert all(_on_worker(thread) for thread, _ in made)
    assert [id(x) for x in seen] == [id(inputs) for _, inputs in made]  # the very tensors the worker made


def test_a_cached_prompt_runs_no_processor(tiny_editor, photo, monkeypatch):
    request = small_request(photo, steps=2, prompt="a prompt this test edits twice")
    tiny_editor.cache.clear()
    tiny_editor.edit(request)
    calls: list[str] = []
    inline = stages.prompt_inputs
    monkeypatch.setattr(
        stages, "prompt_inputs", lambda pipe, prompt, images: calls.append(prompt) or inline(pipe, prompt, images)
    )
    result = tiny_editor.edit(request)
    assert calls == [] and "prompt cache hit" in result.notes


def test_prompts_to_encode_are_those_not_cached(tiny_editor, photo):
    request = small_request(photo, prompt="which prompts", negative_prompt="blurry")
    args = dict(model="m", revision=None, fixes=tiny_editor.fixes, device=torch.device("cpu"), digests=("d",))
    cache = encode_cache.EditCache()
    assert encode_cache.prompts_to_encode(cache, tiny_editor.pipe, request, **args) == ["which prompts", "blurry"]
    assert encode_cache.prompts_to_encode(cache, tiny_editor.pipe, request, **args, uses_cfg=False) == ["which prompts"]
    with torch.inference_mode():
        encode_cache.encode_prompts(cache, tiny_editor.pipe, request, **args, uses_cfg=False)
    assert encode_cache.prompts_to_encode(cache, tiny_editor.pipe, request, **args) == ["blurry"]
    assert cache.prompts.stats()["hits"] == 0  # asking counts nothing


def test_a_failed_edit_leaves_nothing_running_on_the_worker(tiny_editor, photo, monkeypatch):
    """The processor's tokenizer must not run on two threads at once: an edit that fails while its worker
    still makes the prompt's tensors waits for that task, so the next edit (or a rewrite) has the processor
    to itself."""
    from qie.core.editor import Editor

    preps: list[image_prep.PromptPrep] = []
    original = image_prep.PromptPrep

    class Spy(original):
        def __init__(self, *args):
            super().__init__(*args)
            preps.append(self)

    inline = stages.prompt_inputs

    def slow(pipe, prompt, images):
        time.sleep(0.3)
        return inline(pipe, prompt, images)

    def broken(*args, **kwargs):
        raise RuntimeError("the weight check failed")

    monkeypatch.setattr(image_prep, "PromptPrep", Spy)
    monkeypatch.setattr(stages, "prompt_inputs", slow)
    monkeypatch.setattr(Editor, "_predictor", broken)
    tiny_editor.cache.clear()
    with pytest.raises(RuntimeError, match="the weight check failed"):
        tiny_editor.edit(small_request(photo, steps=2, prompt="a prompt for a failing edit"))
    assert preps and preps[0]._inputs is not None and preps[0]._inputs.done()


def test_the_edit_chooses_its_predictor_while_the_worker_prepares_the_prompt(tiny_editor, photo, monkeypatch):
    """The transformer graphs' weight check (in `_predictor`) runs after the worker started the prompt's
    images and tensors and before the prompt is encoded: host work that no longer waits until the
    denoise stage, and runs beside the processor."""
    from qie.core.editor import Editor

    order: list[str] = []
    original_start, original_predictor, original_encode = (
        image_prep.PromptPrep.start,
        Editor._predictor,
        stages.encode_prompt,
    )

    def start(self, prompts):
        order.append("prep started")
        return original_start(self, prompts)

    def predictor(self, *args):
        order.append("predictor")
        return original_predictor(self, *args)

    def encode(pipe, prompt, images, **kw):
        order.append("prompt encoded")
        return original_encode(pipe, prompt, images, **kw)

    monkeypatch.setattr(image_prep.PromptPrep, "start", start)
    monkeypatch.setattr(Editor, "_predictor", predictor)
    monkeypatch.setattr(stages, "encode_prompt", encode)
    tiny_editor.cache.clear()
    tiny_editor.edit(small_request(photo, prompt="another prompt only this test uses"))
    assert order[:3] == ["prep started", "predictor", "prompt encoded"]  # then the negative prompt (CFG)
    assert order.count("predictor") == 1 and set(order[3:]) <= {"prompt encoded"}


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_gets_a_working_worker(tiny_editor):
    """A process forked after an edit (a server's workers) has none of its parent's threads: a pool
    that still counted them would never run the resize and the child's edit would wait forever."""
    import os

    image = Image.new("RGB", (64, 48), "red")
    image_prep.PromptPrep(tiny_editor.pipe, [image]).images()  # the parent's pool now has its threads
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whether its resize came back within 20 s
        code = 1
        try:
            later = image_prep._executor().submit(stages.prompt_images, tiny_editor.pipe, [image])
            code = (
                0 if later.result(timeout=20)[0].size == stages.prompt_images(tiny_editor.pipe, [image])[0].size else 2
            )
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.close(write)
    status = os.read(read, 1)
    os.waitpid(pid, 0)
    assert status == bytes([0])
