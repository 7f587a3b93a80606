"""The text encoder's small input images, resized on a worker thread while the condition encodes.

An edit resizes its inputs twice on the host: to the condition's area for the VAE, and to ~384² for
the text encoder (`stages.prompt_images`). PIL's resampling releases the GIL, so the second resize
runs on another core while the main thread resizes, uploads and VAE-encodes the condition; the
images are the same, bit for bit.

Example:
    >>> from PIL import Image
    >>> later = prompt_images_later(pipe, [Image.new("RGB", (1024, 1024))])  # doctest: +SKIP
    >>> later()[0].size                                                      # doctest: +SKIP
    (384, 384)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from qie.core import stages

_WORKERS = 2  # one edit needs one; a process serving two GPUs may run two edits at once
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def prompt_images_later(pipe: Any, images: Sequence[Image.Image]) -> Callable[[], list[Image.Image]]:
    """`stages.prompt_images(pipe, images)` started on a worker thread; calling the result waits for the
    images (and raises what the resize raised). The images are loaded here first: PIL loads lazily, and
    the caller's thread reads them meanwhile (digests, the condition's resize)."""
    images = list(images)
    for image in images:
        image.load()  # two threads must not load one lazily opened file at once
    return _executor().submit(stages.prompt_images, pipe, images).result


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
