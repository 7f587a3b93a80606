"""The text encoder's small images made on a worker thread: the same images, from another thread."""

import threading

import numpy as np
import pytest
from conftest import small_request
from PIL import Image

from qie.core import image_prep, stages


def test_prompt_images_later_equal_the_inline_ones_and_come_from_another_thread(tiny_editor, photo, monkeypatch):
    threads: list[str] = []
    inline = stages.prompt_images

    def spy(pipe, images):
        threads.append(threading.current_thread().name)
        return inline(pipe, images)

    monkeypatch.setattr(stages, "prompt_images", spy)
    images = [photo, photo.rotate(90, expand=True)]
    later = image_prep.prompt_images_later(tiny_editor.pipe, images)
    got, want = later(), inline(tiny_editor.pipe, images)
    assert [img.size for img in got] == [img.size for img in want]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, want, strict=True))
    assert threads and threads[0].startswith("qie-image-prep") and threads[0] != threading.current_thread().name


def test_a_resize_error_reaches_the_caller_when_it_asks_for_the_images(tiny_editor, monkeypatch):
    def broken(pipe, images):
        raise OSError("truncated image")

    monkeypatch.setattr(stages, "prompt_images", broken)
    later = image_prep.prompt_images_later(tiny_editor.pipe, [Image.new("RGB", (64, 64))])
    with pytest.raises(OSError, match="truncated image"):
        later()


def test_an_edit_encodes_its_prompt_with_the_workers_images(tiny_editor, photo, monkeypatch):
    made: list[list[Image.Image]] = []
    original = image_prep.prompt_images_later

    def spy(pipe, images):
        wait = original(pipe, images)

        def result():
            made.append(wait())
            return made[-1]

        return result

    seen: list[list[Image.Image]] = []
    encode = stages.encode_prompt

    def encode_spy(pipe, prompt, images, **kw):
        seen.append(list(images))
        return encode(pipe, prompt, images, **kw)

    monkeypatch.setattr(image_prep, "prompt_images_later", spy)
    monkeypatch.setattr(stages, "encode_prompt", encode_spy)
    tiny_editor.cache.clear()
    tiny_editor.edit(small_request(photo, steps=2, prompt="a prompt only this test uses"))
    assert made and seen and seen[0] == made[0]  # the very images the worker resized


def test_the_edit_chooses_its_predictor_while_the_prompt_images_resize(tiny_editor, photo, monkeypatch):
    """The transformer graphs' weight check (in `_predictor`) runs after the worker started the resize and
    before the prompt is encoded: host work that no longer waits until the denoise stage."""
    from qie.core.editor import Editor

    order: list[str] = []
    original_later, original_predictor, original_encode = (
        image_prep.prompt_images_later,
        Editor._predictor,
        stages.encode_prompt,
    )

    def later(pipe, images):
        order.append("resize started")
        return original_later(pipe, images)

    def predictor(self, *args):
        order.append("predictor")
        return original_predictor(self, *args)

    def encode(pipe, prompt, images, **kw):
        order.append("prompt encoded")
        return original_encode(pipe, prompt, images, **kw)

    monkeypatch.setattr(image_prep, "prompt_images_later", later)
    monkeypatch.setattr(Editor, "_predictor", predictor)
    monkeypatch.setattr(stages, "encode_prompt", encode)
    tiny_editor.cache.clear()
    tiny_editor.edit(small_request(photo, prompt="another prompt only this test uses"))
    assert order[:3] == ["resize started", "predictor", "prompt encoded"]  # then the negative prompt (CFG)
    assert order.count("predictor") == 1 and set(order[3:]) <= {"prompt encoded"}


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_gets_a_working_worker(tiny_editor):
    """A process forked after an edit (a server's workers) has none of its parent's threads: a pool
    that still counted them would never run the resize and the child's edit would wait forever."""
    import os

    image = Image.new("RGB", (64, 48), "red")
    image_prep.prompt_images_later(tiny_editor.pipe, [image])()  # the parent's pool now has its threads
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
