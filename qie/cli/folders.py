"""Editing files: one edit to a PNG, or a whole folder with progress, per-file errors and resume."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from qie.core.images import IMAGE_SUFFIXES, save_png
from qie.core.metadata import png_metadata
from qie.core.request import EditRequest, EditResult
from qie.errors import QieError

log = logging.getLogger(__name__)


@dataclass
class BatchReport:
    """What a folder run did."""

    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"{len(self.done)} edited, {len(self.skipped)} skipped (output exists), {len(self.failed)} failed"]
        lines += [f"  failed: {path.name}: {why}" for path, why in self.failed.items()]
        return "\n".join(lines)


def edit_one(
    editor: Any, inputs: list[Path], output: Path, params: dict[str, Any], *, rewrite: bool = False
) -> EditResult:
    """Edit `inputs` (1-3 images) with `params` and save the PNG (with metadata) at `output`.

    With `rewrite`, the text encoder first rewrites the prompt (`Editor.rewrite_prompt`); the
    rewritten prompt is printed and used.
    """
    if rewrite:
        params = {**params, "prompt": editor.rewrite_prompt(inputs, params["prompt"])}
        print(f"rewritten prompt ({', '.join(p.name for p in inputs)}): {params['prompt']}", flush=True)
    request = EditRequest(images=inputs, **params)
    result = editor.edit(request)
    save_png(result.image, output, png_metadata(editor, request, result))
    return result


def edit_folder(
    editor: Any, folder: Path, out_dir: Path, params: dict[str, Any], *, rewrite: bool = False
) -> BatchReport:
    """Edit every image in `folder` into `out_dir/<name>.png`; existing outputs are skipped.

    With `rewrite`, each image's prompt is rewritten for that image (see `edit_one`)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    report = BatchReport()
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in tqdm(files, desc="editing", unit="image"):
        target = out_dir / (path.stem + ".png")
        if target.exists():
            report.skipped.append(path)
            continue
        try:
            edit_one(editor, [path], target, params, rewrite=rewrite)
            report.done.append(path)
        except QieError as exc:
            log.warning("%s failed: %s", path.name, exc)
            report.failed[path] = str(exc)
    return report
