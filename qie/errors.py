"""The `QieError` family: every error qie raises on purpose.

Messages name the parameter, the bad value and the fix, so an adapter (CLI, web app, HTTP server)
can show them to a person as they are.
"""

from __future__ import annotations

from typing import Any


class QieError(Exception):
    """Base class of every error qie raises on purpose."""


class InvalidRequestError(QieError, ValueError):
    """A request parameter is out of range or malformed."""

    def __init__(self, param: str, value: Any, fix: str) -> None:
        self.param = param
        self.value = value
        self.fix = fix
        super().__init__(f"{param}={_show(value)} is not valid: {fix}")


class ImageError(InvalidRequestError):
    """An input image cannot be read or is outside the limits."""


class ModelLoadError(QieError):
    """The model's weights or components cannot be loaded."""


class ResourceError(QieError):
    """The hardware cannot run the request (no GPU, not enough memory)."""


class CancelledError(QieError):
    """The edit was cancelled before it finished."""


class BusyError(QieError):
    """The editor is busy with other work and the caller would not wait longer."""


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
