"""Time limits for edits: a cancel event that also fires once a deadline has passed.

`Editor.edit(..., cancel=event)` stops at the next denoising step once `event` is set and frees the
GPU; `Deadline` is such an event that sets itself after `seconds` (the app's per-edit limit). The
web app's per-session cancellation lives in `qie.app.jobs`.

Example:
    >>> Deadline(0).is_set()
    True
"""

from __future__ import annotations

import threading
import time


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
