"""Editing files: one edit to a file, or a whole folder with progress, per-file errors and resume.

A folder run is planned before the model loads: which files are images (and why the others are
not taken), and one output name per input (`same.jpg` and `same.png` become `same-jpg.png` and
`same-png.png` instead of one overwriting the other's result).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from qie.core.images import IMAGE_SUFFIXES
from qie.core.metadata import png_metadata
from qie.core.outputs import is_disk_full, save_image
from qie.core.request import EditRequest, EditResult
from qie.errors import QieError

log = logging.getLogger(__name__)


@dataclass
class FolderPlan:
    """What a folder run will do: (input, output) pairs, the entries it leaves out and why."""

    jobs: list[tuple[Path, Path]] = field(default_factory=list)
    not_taken: dict[Path, str] = field(default_factory=dict)
    renamed: list[Path] = field(default_factory=list)  # inputs whose output name keeps their extension

    def describe(self) -> list[str]:
        """Lines for people: what is left out and which outputs were renamed."""
        lines = [f"  not taken: {path.name}: {why}" for path, why in self.not_taken.items()]
        lines += [
            f"  {path.name} -> {out.name} (another input has the same name)"
            for path, out in self.jobs
            if path in self.renamed
        ]
        return lines


@dataclass
class BatchReport:
    """What a folder run did."""

    total: int = 0
    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)
    not_taken: dict[Path, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"{len(self.done)} edited, {len(self.skipped)} skipped (output exists), {len(self.failed)} failed"
            + (f", {len(self.not_taken)} not images" if self.not_taken else "")
        ]
        lines += [f"  failed: {path.name}: {why}" for path, why in self.failed.items()]
        lines += [f"  not taken: {path.name}: {why}" for path, why in self.not_taken.items()]
        return "\n".join(lines)


def plan_folder(folder: Path, out_dir: Path) -> FolderPlan:
    """The files of `folder` to edit into `out_dir`, each with a unique `<name>.png`."""
    plan = FolderPlan()
    images = []
    for path in sorted(folder.iterdir()):
        why = _not_an_image(path)
        if why:
            plan.not_taken[path] = why
        else:
            images.append(path)
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for path in images:
        by_stem[path.stem.lower()].append(path)
    for path in images:
        if len(by_stem[path.stem.lower()]) > 1:
            plan.renamed.append(path)
            plan.jobs.append((path, out_dir / f"{path.stem}-{path.suffix[1:].lower()}.png"))
        else:
            plan.jobs.append((path, out_dir / f"{path.stem}.png"))
    return plan


def _not_an_image(path: Path) -> str:
    if path.name.startswith("."):
        return "hidden file"
    if path.is_dir():
        return "a folder (folders inside are not searched)"
    if not path.is_file():
        return "not a regular file"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        kind = path.suffix or "no suffix"
        return f"{kind} is not an image type qie reads ({' '.join(IMAGE_SUFFIXES)})"
    return ""


def edit_one(
    editor: Any,
    inputs: list[Path],
    output: Path,
    params: dict[str, Any],
    on_step: Callable[[int, int], None] | None = None,
    *,
    rewrite: bool = False,
) -> EditResult:
    """Edit `inputs` (1-3 images) with `params` and save the result (with metadata) at `output`.

    The format follows `output`'s suffix (.png, .jpg/.jpeg, .webp; see `qie.core.outputs`). With
    `rewrite`, the text encoder first rewrites the prompt (`Editor.rewrite_prompt`); the rewritten
    prompt is printed and used.
    """
    if rewrite:
        params = {**params, "prompt": editor.rewrite_prompt(inputs, params["prompt"])}
        print(f"rewritten prompt ({', '.join(p.name for p in inputs)}): {params['prompt']}", flush=True)
    request = EditRequest(images=inputs, **params)
    result = editor.edit(request, on_step=on_step)
    save_image(result.image, output, png_metadata(editor, request, result))
    return result


def edit_folder(
    editor: Any, plan: FolderPlan, params: dict[str, Any], report: BatchReport, *, rewrite: bool = False
) -> BatchReport:
    """Edit every job of `plan` into its output; existing outputs are skipped (resume).

    With `rewrite`, each image's prompt is rewritten for that image (see `edit_one`).
    A file that fails is reported and the batch goes on; a full disk stops it (the error is
    raised after the report records the file). `report` fills as the run goes, so a caller that
    is interrupted still knows what was done.
    """
    report.total, report.not_taken = len(plan.jobs), dict(plan.not_taken)
    for path, target in tqdm(plan.jobs, desc="editing", unit="image"):
        if target.exists():
            report.skipped.append(path)
            continue
        try:
            edit_one(editor, [path], target, params, rewrite=rewrite)
            report.done.append(path)
        except QieError as exc:
            report.failed[path] = str(exc)
            if is_disk_full(exc):
                raise
            log.warning("%s failed: %s", path.name, exc)
    return report
