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


class OutputError(QieError):
    """A result cannot be written (folder missing or read-only, disk full, unsupported format)."""

    def __init__(self, path: object, why: str, fix: str) -> None:
        self.path, self.why, self.fix = path, why, fix
        super().__init__(f"cannot write {path}: {why}; {fix}")


class ResourceError(QieError):
    """The hardware cannot run the request (no GPU, not enough memory)."""


class CancelledError(QieError):
    """The edit was cancelled before it finished."""


class EditTimeoutError(CancelledError):
    """The edit ran past its time limit and was stopped."""


class BusyError(QieError):
    """The editor is busy with other work and the caller would not wait longer."""


class SafetyError(QieError):
    """The safety filter blocked an input image or the output (see `qie.core.safety`)."""

    def __init__(self, where: str, label: str, score: float, threshold: float, model: str, why: str = "") -> None:
        self.where, self.label, self.score, self.threshold, self.model = where, label, score, threshold, model
        why = why or f"{label!r} scored {score:.2f}, at or above the threshold {threshold:.2f}"
        super().__init__(
            f"{where} was blocked by the safety filter ({model}): {why}. Use another image or prompt; "
            "operators can tune QIE_SAFETY_THRESHOLD"
        )


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
