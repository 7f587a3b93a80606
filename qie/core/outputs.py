"""Writing results: PNG, JPEG or WebP by the file's suffix, the edit's metadata kept, never half a file.

PNG keeps the metadata as text chunks (`qie.core.images.png_info`); JPEG and WebP as EXIF
(ImageDescription holds the JSON, Software names qie) and as an XMP packet (`qie:parameters`).
A file is written beside its final name and renamed; on any failure the partial file is removed
and an `OutputError` says why (a full disk, a read-only folder) and what to do.

Example:
    >>> check_output_file("out/result.webp").suffix                     # doctest: +SKIP
    '.webp'
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Mapping
from html import escape
from pathlib import Path
from typing import Any

from PIL import Image

from qie.core.images import png_info
from qie.errors import OutputError
from qie.versions import __version__

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
QUALITY = 95  # JPEG and (lossy) WebP
EXIF_DESCRIPTION, EXIF_SOFTWARE = 0x010E, 0x0131
XMP_NAMESPACE = "urn:qie:parameters:1"


def check_output_file(path: str | os.PathLike) -> Path:
    """Refuse, before any work, an output that cannot be written: unknown suffix, a folder, no write access."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(path, "it is a folder", f"name a file in it, e.g. {path / 'result.png'}")
    if path.suffix.lower() not in FORMATS:
        raise OutputError(path, f"{path.suffix or 'no suffix'} is not a format qie writes", f"end it in {_suffixes()}")
    check_output_folder(path.parent)
    return path


def check_output_folder(folder: str | os.PathLike) -> Path:
    """Create `folder` if needed and make sure a file can be written in it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(folder, "it is a file, not a folder", "name a folder (or a new path)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".qie-write-check-"):
            pass
    except OSError as exc:
        raise _write_error(folder, exc) from exc
    return folder


def save_image(image: Image.Image, path: str | os.PathLike, metadata: Mapping[str, Any]) -> Path:
    """Save `image` at `path` in the format its suffix names, with `metadata`; atomically."""
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise OutputError(path, f"{path.suffix or 'no suffix'} is not a format qie writes", f"end it in {_suffixes()}")
    partial = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(partial, format=kind, **_format_options(kind, metadata))
        partial.replace(path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise _write_error(path, exc) from exc
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The edit parameters saved in a PNG, JPEG or WebP written by `save_image` ({} when none)."""
    with Image.open(path) as img:
        text = img.text.get("qie") if hasattr(img, "text") else None
        if text is None:
            text = img.getexif().get(EXIF_DESCRIPTION)
    return json.loads(text) if text else {}


def is_disk_full(exc: BaseException) -> bool:
    """True when `exc` (or its cause) is the file system's "no space left" (or quota) error."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _format_options(kind: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
    if kind == "PNG":
        return {"pnginfo": png_info(metadata)}
    text = json.dumps(dict(metadata), default=str)  # ASCII: EXIF text is ASCII
    exif = Image.Exif()
    exif[EXIF_DESCRIPTION] = text
    exif[EXIF_SOFTWARE] = f"qie {__version__}"
    return {"quality": QUALITY, "exif": exif.tobytes(), "xmp": _xmp(text)}


def _xmp(text: str) -> bytes:
    packet = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:qie="{XMP_NAMESPACE}" qie:parameters="{escape(text)}"/>'
        '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    )
    return packet.encode()


def _write_error(path: Path, exc: OSError) -> OutputError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(path, "the disk is full", "free some space and run the same command again")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(path, "no permission to write there", "choose a folder you can write to")
    return OutputError(path, exc.strerror or str(exc), "check the path")


def _suffixes() -> str:
    return ", ".join(FORMATS)
