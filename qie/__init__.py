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

from .errors import (
    BusyError,
    CancelledError,
    EditTimeoutError,
    ImageError,
    InvalidRequestError,
    ModelLoadError,
    QieError,
    ResourceError,
    SafetyError,
)

__version__ = "0.1.0"

_LAZY = {
    "EditRequest": "qie.request",
    "EditResult": "qie.request",
    "Editor": "qie.editor",
    "get_editor": "qie.editor",
    "set_editor": "qie.editor",
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
    "QieError",
    "ResourceError",
    "SafetyError",
    "__version__",
    "get_editor",
    "set_editor",
]

if TYPE_CHECKING:
    from .editor import Editor, get_editor, set_editor
    from .request import EditRequest, EditResult


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qie' has no attribute {name!r}")
