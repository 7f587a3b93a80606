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
