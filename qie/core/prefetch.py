"""Host work started on a worker thread while the caller goes on: `Prefetch(fn, *args).result()`.

An edit's text encode begins with host work only (the input images' resize for the text encoder,
tokenizing, the processor's patches: ~30 ms for a 1024² input on an H200 machine's host), while the
condition's VAE encode before it is mostly the GPU's. `Editor.encode` starts the first on a thread
and launches the second meanwhile; PIL's resize and NumPy release the GIL for most of it.

Example:
    >>> job = Prefetch(sum, [1, 2, 3])
    >>> job.result()
    6
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Prefetch(Generic[T]):
    """`fn(*args)` running on its own daemon thread; `result()` waits for it and returns or raises as it did."""

    def __init__(self, fn: Callable[..., T], *args: Any, name: str = "qie-prefetch") -> None:
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., T], args: tuple) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:  # handed to the caller by `result`
            self._error = exc

    def result(self) -> T:
        """`fn(*args)`'s return value, once it is done; its exception, raised here, if it raised one."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def wait(self) -> None:
        """Wait until `fn` is done, whatever it returned or raised."""
        self._thread.join()
