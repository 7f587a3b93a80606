"""Which files an edit may open: only those Gradio received for this request.

An event with `preprocess=False` gets file dicts as the caller sent them, so a caller could put any
server path in `path`. A file is opened only when Gradio itself checked it for this request (its
`FileData` marker is there, or Gradio preprocessed the value) and it lies, after resolving links, in
Gradio's upload folder. Everything else is refused with one message that does not tell whether the
path exists.

Example:
    >>> received_path({"path": "/etc/passwd"}, "Image")           # doctest: +SKIP
    Traceback (most recent call last):
    qie.errors.InvalidRequestError: Image='/etc/passwd' is not valid: ...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qie.errors import InvalidRequestError

FILE_DATA = "gradio.FileData"
REFUSED = "only images uploaded with this request can be edited; upload the image again"


def upload_folder() -> Path:
    """Gradio's folder of uploads and cached files (as Gradio computes it)."""
    from gradio.utils import get_upload_folder

    return Path(os.path.realpath(get_upload_folder()))


def received_path(value: Any, name: str, *, preprocessed: bool = False) -> str:
    """The path of an uploaded image `value` (a Gradio file dict, or a path Gradio preprocessed).

    Raises `InvalidRequestError(name, ...)` with the same message for any other value or path,
    whether or not it exists.
    """
    if isinstance(value, dict):
        meta = value.get("meta")
        checked = isinstance(meta, dict) and meta.get("_type") == FILE_DATA
        path = value.get("path")
    else:
        checked, path = preprocessed, value
    if not checked or not isinstance(path, str) or not path:
        raise InvalidRequestError(name, _shown(value), REFUSED)
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(upload_folder()) or not real.is_file():
        raise InvalidRequestError(name, _shown(value), REFUSED)
    return str(real)


def _shown(value: Any) -> str:
    """What the message shows of the refused value: the file's own name, never its folder."""
    if isinstance(value, dict):
        value = value.get("orig_name") or value.get("path")
    return Path(str(value)).name if value else ""
