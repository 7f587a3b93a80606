"""The text encoder's inputs made on a worker thread while the condition encodes.

An edit resizes its inputs twice on the host: to the condition's area for the VAE, and to ~384² for
the text encoder (`stages.prompt_images`); then the processor turns the small images and the
templated prompt into the text encoder's tensors (`stages.prompt_inputs`: ~15 ms of resampling,
rescaling and patching on the host). `PromptPrep` runs both on another core while the main thread
hashes, uploads and VAE-encodes the condition and checks the transformer's weights for its CUDA
graphs: PIL's resampling and numpy's array work release the GIL. The images and tensors are the
same, bit for bit.

Example:
    >>> from PIL import Image
    >>> prep = PromptPrep(pipe, [Image.new("RGB", (1024, 1024))])  # doctest: +SKIP
    >>> prep.start(["make it blue"])                                # doctest: +SKIP
    >>> prep.images()[0].size, prep.inputs("make it blue") is not None  # doctest: +SKIP
    ((384, 384), True)
    >>> prep.settle()                                               # doctest: +SKIP
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from PIL import Image

from qie.core import stages

_WORKERS = 2  # one edit needs one; a process serving two GPUs may run two edits at once
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


class PromptPrep:
    """The small images of one edit's inputs, resized on a worker from construction on, and the processor's
    tensors for the prompts given to `start`, made there after them (one task, so one processor is never
    used by two threads at once).

    Call `settle` before the processor may be used elsewhere (the edit's end): it waits for the worker's
    task. Errors (a truncated image, an over-long prompt) reach the caller of `images` or `inputs`.
    """

    def __init__(self, pipe: Any, images: Sequence[Image.Image]) -> None:
        self.pipe = pipe
        images = list(images)
        for image in images:
            image.load()  # two threads must not load one lazily opened file at once
        self._images: Future[list[Image.Image]] = _executor().submit(stages.prompt_images, pipe, images)
        self._inputs: Future[dict[str, Any]] | None = None

    def images(self) -> list[Image.Image]:
        """`stages.prompt_images(pipe, images)`, waiting for the worker."""
        return self._images.result()

    def start(self, prompts: Sequence[str]) -> None:
        """Make `stages.prompt_inputs` for each of `prompts` on the worker, after the images (once per edit)."""
        if self._inputs is not None:
            raise RuntimeError("PromptPrep.start runs once per edit")
        if prompts:
            texts = list(dict.fromkeys(prompts))
            self._inputs = _executor().submit(self._make_inputs, texts)

    def inputs(self, prompt: str) -> Any | None:
        """The processor's tensors for `prompt` made on the worker (waiting for them), or None when `start`
        was not given it. Each is handed out once: the text encoder's upload moves it to the GPU."""
        if self._inputs is None:
            return None
        return self._inputs.result().pop(prompt, None)

    def settle(self) -> None:
        """Wait until the worker is done with this edit (its errors are the edit's, raised where asked)."""
        for future in (self._images, self._inputs):
            if future is not None:
                wait([future])

    def _make_inputs(self, texts: list[str]) -> dict[str, Any]:
        images = self._images.result()  # submitted earlier, so already running or done: no deadlock
        return {text: stages.prompt_inputs(self.pipe, text, images) for text in texts}


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="qie-image-prep")
        return _pool


def _forget_pool() -> None:
    """In a forked child: the parent's worker threads do not exist there, and a pool that counts them
    would never run a task (the edit would wait forever); the child makes its own."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)
