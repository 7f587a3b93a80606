"""Cancellable edits, one per client session: the web app's Cancel button reaches the running edit.

`Editor.edit(..., cancel=event)` stops at the next denoising step once `event` is set and frees the
GPU. `CancelBoard` hands out such an event for each running job and sets it on request.

Example:
    >>> board = CancelBoard()
    >>> with board.job("session-1") as cancel:
    ...     board.cancel("session-1")
    ...     cancel.is_set()
    True
    True
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class CancelBoard:
    """Maps a session key to the cancel event of its running edit (thread-safe)."""

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    @contextmanager
    def job(self, key: str) -> Iterator[threading.Event]:
        """Register a running job for `key` for the duration of the block; yields its cancel event."""
        event = threading.Event()
        with self._lock:
            self._events[key] = event
        try:
            yield event
        finally:
            with self._lock:
                if self._events.get(key) is event:
                    del self._events[key]

    def cancel(self, key: str) -> bool:
        """Ask the running job of `key` to stop; False when it has none."""
        with self._lock:
            event = self._events.get(key)
        if event is None:
            return False
        event.set()
        return True

    def running(self, key: str) -> bool:
        """Whether `key` has a job in progress."""
        with self._lock:
            return key in self._events


class Deadline(threading.Event):
    """A cancel event that is also set once `seconds` have passed (or when `parent` is set).

    Pass it as `Editor.edit(..., cancel=deadline)`: the edit stops at its next step after the
    deadline and raises `EditTimeoutError`.

    Example:
        >>> Deadline(0).is_set()
        True
    """

    def __init__(self, seconds: float, parent: threading.Event | None = None) -> None:
        super().__init__()
        self.seconds = seconds
        self.parent = parent
        self._end = time.monotonic() + seconds

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self._end

    def is_set(self) -> bool:
        return super().is_set() or self.expired or (self.parent is not None and self.parent.is_set())
