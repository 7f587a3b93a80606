"""qie: fast, memory-frugal instruction-based image editing with Qwen-Image-Edit-2509.

Importing qie loads no model and does not import torch; the names below resolve on first use.

Example:
    >>> import qie
    >>> editor = qie.Editor.load("tiny")                                   # doctest: +SKIP
    >>> req = qie.EditRequest(images=["photo.jpg"], prompt="pure white background", seed=1)  # doctest: +SKIP
    >>> editor.edit(req).image.save("out.png")                             # doctest: +SKIP
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from qie.errors import (
    BusyError,
    CancelledError,
    EditTimeoutError,
    ImageError,
    InvalidRequestError,
    ModelLoadError,
    OutputError,
    QieError,
    ResourceError,
    SafetyError,
)
from qie.versions import __version__

_LAZY = {
    "EditRequest": "qie.core.request",
    "EditResult": "qie.core.request",
    "Editor": "qie.core.editor",
    "get_editor": "qie.core.editor",
    "set_editor": "qie.core.editor",
}

__all__ = [
    "BusyError",
    "CancelledError",
    "EditTimeoutError",
    "EditRequest",
    "EditResult",
    "Editor",
    "ImageError",
    "InvalidRequestError",
    "ModelLoadError",
    "OutputError",
    "QieError",
    "ResourceError",
    "SafetyError",
    "__version__",
    "get_editor",
    "set_editor",
]

if TYPE_CHECKING:
    from qie.core.editor import Editor, get_editor, set_editor
    from qie.core.request import EditRequest, EditResult


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qie' has no attribute {name!r}")
