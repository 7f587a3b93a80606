"""What the app's events do. Handlers take the controls' values by name and return values by component.

The edit runs in two presentations of one core: `/edit` for API callers (errors are Gradio errors,
as clients expect) and the page's Edit button (a bad input is a toast, a Cancel a neutral line in
the stats, the last result stays). No handler opens a file Gradio did not receive for the request
(`qie.app.uploads`), and every edit stops at its next step when cancelled or when its client goes
away (`qie.app.jobs`).
"""

from __future__ import annotations

import errno
import logging
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

import qie
from qie.app.form import FORM_FIELDS, EditForm, build_request
from qie.app.jobs import Job, SessionJobs, gradio_event, run_cancellable
from qie.app.layout import NO_FAST_LORA, Layout
from qie.app.presets import FAST_MODE_SETTINGS, REPEATED_EDIT_WARNING, preset_prompt
from qie.app.pricetag import tag_in_prompt

log = logging.getLogger("qie.app")

LOCK_TIMEOUT_S = 600.0  # how long a dequeued edit waits for the editor (e.g. behind an example being cached)
OUTPUT_TTL_S = 3600.0  # result PNGs are kept this long
CANCEL_WAIT_S = 10.0  # how long Cancel waits for the edit to reach its next step, to report where it stopped
TINY_HINT = "To try the app without a GPU, start the offline demo: python app.py --model tiny"
DISK_FULL = (
    "The server's disk is full, so the result could not be saved. Nothing was kept; "
    "try again later (operators: free space in {folder})."
)
# Each request parameter as the page names it, so messages speak of the controls a person sees.
CONTROL_LABELS = {
    "images[0]": "Image",
    "images[1]": "Image 2",
    "images[2]": "Image 3",
    "image": "Image",
    "image_2": "Image 2",
    "image_3": "Image 3",
    "prompt": "Instruction",
    "negative_prompt": "Negative prompt",
    "steps": "Steps",
    "true_cfg_scale": "True CFG scale",
    "seed": "Seed",
    "max_side": "Longest output side",
    "height": "Longest output side",
    "width": "Longest output side",
    "condition_area": "Encode the input images at",
    "mode": "Mode",
    "tile_size": "VAE tile size",
    "attention_quant": "Attention / KV quantization",
    "early_exit": "Early exit",
    "price_tag": "Price tag text",
}
PRIVATE_NOTES = ("cache hit",)  # they would tell a visitor that someone else sent the same image and prompt


def explain(exc: qie.QieError) -> str:
    """The error in the page's words: the control's label, the bad value and the fix."""
    if isinstance(exc, qie.InvalidRequestError) and exc.param in CONTROL_LABELS:
        label = CONTROL_LABELS[exc.param]
        return f"{label}: {exc.fix}" if exc.value is None else f"{label}: {exc}"
    if isinstance(exc, qie.ResourceError):
        return f"{exc} {TINY_HINT}"
    if isinstance(exc, qie.BusyError):
        return f"The app is busy: {exc}"
    return str(exc)


def public_notes(notes: tuple[str, ...] | list[str]) -> list[str]:
    """The notes a visitor may see: none that reveals what other visitors sent."""
    return [n for n in notes if not any(private in n for private in PRIVATE_NOTES)]


def stats_line(result: Any) -> str:
    """One line: per-stage times, peak memory, plan, seed, steps, output size and the public notes."""
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    vram = f"peak VRAM {result.peak_vram_gib:.1f} GiB" if result.peak_vram_gib is not None else "CPU"
    skipped = f" ({result.steps_skipped} skipped)" if result.steps_skipped else ""
    notes = "".join(f" | {note}" for note in public_notes(result.notes))
    return (
        f"{stages} | {vram} | plan {result.plan} | seed {result.seed} | steps {result.steps_run}{skipped} | "
        f"output {result.image.width}x{result.image.height}{notes}"
    )


def output_dir() -> Path:
    """Where result PNGs are written; files (and any partial ones) older than `OUTPUT_TTL_S` go on the way."""
    folder = Path(tempfile.gettempdir()) / "qie-app"
    folder.mkdir(exist_ok=True)
    cutoff = time.time() - OUTPUT_TTL_S
    for old in [*folder.glob("*.png"), *folder.glob("*.png.partial")]:
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:  # removed meanwhile by another request
            continue
    return folder


def save_result(image: Any, metadata: dict[str, Any], seed: int) -> str:
    """Write the result PNG; a full disk becomes a clear `ResourceError` and leaves no partial file."""
    from qie.core.images import save_png

    folder = output_dir()
    path = folder / f"qie-{seed}-{uuid.uuid4().hex[:8]}.png"
    try:
        return str(save_png(image, path, metadata))
    except OSError as exc:
        path.with_name(path.name + ".partial").unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log.error("result not saved: disk full in %s", folder)
            raise qie.ResourceError(DISK_FULL.format(folder=folder)) from None
        raise


def run_edit(editor: Any, request: Any, cancel: Any, on_step: Callable[[int, int], None], tag: str | None) -> dict:
    """The GPU work of one edit: run it, write the PNG (with the CLI's metadata) and the before image.

    With `tag`, a failed or blocked edit falls back to the price tag drawn from a template.
    """
    from qie.app.pricetag import edit_or_render
    from qie.core.metadata import png_metadata

    kwargs = {"on_step": on_step, "cancel": cancel, "timeout": LOCK_TIMEOUT_S}
    result = edit_or_render(editor, request, tag, **kwargs) if tag else editor.edit(request, **kwargs)
    png = save_result(result.image, png_metadata(editor, request, result), result.seed)
    before = request.images[-1].resize(result.image.size)
    return {"before": before, "after": result.image, "png": png, "stats": stats_line(result)}


class Handlers:
    """The app's event handlers around one editor factory and one layout."""

    def __init__(
        self,
        layout: Layout,
        editor_factory: Callable[[], Any],
        *,
        start: dict[str, Any],
        gpu: Callable[..., dict] = run_edit,
        edit_timeout_s: Callable[[], float] = lambda: 900.0,
        fast_lora: bool = False,
    ) -> None:
        self.fast_lora = fast_lora
        self.ui = layout
        self.editor_factory = editor_factory
        self.start = start
        self.gpu = gpu
        self.edit_timeout_s = edit_timeout_s
        self.jobs = SessionJobs()

    # --- the edit ---------------------------------------------------------------------------------

    def _work(self, form: EditForm, job: Job, progress: gr.Progress, preprocessed: bool) -> dict:
        """Validate, get the editor, run the edit (in a worker thread)."""
        from qie.serving.jobs import Deadline

        if form.mode == "fast" and not self.fast_lora:
            raise qie.InvalidRequestError("mode", form.mode, NO_FAST_LORA)
        request = build_request(form, preprocessed=preprocessed)  # validate before touching the GPU
        progress(0, desc="getting the model ready")
        editor = self.editor_factory()
        progress(0, desc="encoding the instruction and images")

        def on_step(step: int, total: int) -> None:
            job.on_step(step, total)
            progress((step, total), desc="denoising", unit="steps")

        # A price-tag edit that fails is replaced by the tag drawn from a template (and says so).
        tag = form.price_tag if tag_in_prompt(request.prompt, form.price_tag) else None
        out = self.gpu(editor, request, Deadline(self.edit_timeout_s(), parent=job), on_step, tag)
        return {**out, "seed": request.seed}

    async def _run(
        self, form: EditForm, request: gr.Request | None, progress: gr.Progress, preprocessed: bool = False
    ) -> tuple[dict, Job]:
        key = request.session_hash if request is not None and request.session_hash else uuid.uuid4().hex
        event = gradio_event()
        with self.jobs.job(key) as job:
            if self.jobs.cancelled_since(key, getattr(event, "enqueue_time", None)):
                raise qie.CancelledError("cancelled while waiting in the queue")
            out = await run_cancellable(lambda: self._work(form, job, progress, preprocessed), job, event)
        return out, job

    def _outputs(self, out: dict) -> dict:
        return {
            self.ui.result: (out["before"], out["after"]),
            self.ui.download: out["png"],
            self.ui.stats: out["stats"],
            self.ui.seed: out["seed"],
        }

    async def edit_api(
        self,
        request: gr.Request | None = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008  (Gradio's way to ask for a progress bar)
        **values: Any,
    ) -> dict:
        """Edit 1-3 images with an instruction; returns before/after, the PNG, stats and the seed used."""
        try:
            out, _ = await self._run(EditForm(**values), request, progress)
        except qie.QieError as exc:
            raise gr.Error(explain(exc), print_exception=False) from exc
        return self._outputs(out)

    async def edit_page(
        self,
        request: gr.Request | None = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008
        **values: Any,
    ) -> dict:
        """The Edit button: like `/edit`, but a bad input is a toast and a cancel keeps the last result."""
        keep = {self.ui.result: gr.skip(), self.ui.download: gr.skip(), self.ui.seed: gr.skip()}
        try:
            out, _ = await self._run(EditForm(**values), request, progress)
        except qie.CancelledError as exc:
            if isinstance(exc, qie.EditTimeoutError):
                gr.Warning(explain(exc))
            return {**keep, self.ui.stats: self._cancelled_text(request)}
        except qie.QieError as exc:
            gr.Warning(explain(exc))
            return {**keep, self.ui.stats: gr.skip()}
        return self._outputs(out)

    async def edit_example(self, image: str, prompt: str, request: gr.Request | None = None) -> dict:
        """An example: its image (a file Gradio cached) with its instruction and a fixed seed."""
        form = EditForm(image=image, prompt=prompt, randomize_seed=False, **_start_form(self.start))
        try:
            out, _ = await self._run(form, request, gr.Progress(), preprocessed=True)
        except qie.QieError as exc:
            raise gr.Error(explain(exc), print_exception=False) from exc
        return self._outputs(out)

    # --- cancel, metrics, presets, reuse, mode -----------------------------------------------------

    def _cancelled_text(self, request: gr.Request | None) -> str:
        job = self.jobs.last(request.session_hash) if request is not None and request.session_hash else None
        return job.progress_text() if job is not None else "Cancelled."

    def cancel(self, request: gr.Request) -> dict:
        """Stop this tab's running edit at its next step; its edits still waiting are dropped."""
        key = request.session_hash or ""
        job = self.jobs.cancel(key)
        if job is None:
            return {self.ui.stats: "Cancelled: no edit of yours was running (a waiting one is dropped)."}
        job.finished.wait(CANCEL_WAIT_S)  # it stops at its next step: report where
        return {self.ui.stats: job.progress_text()}

    def show_metrics(self) -> dict:
        """Aggregate figures only: request counts by outcome, latency percentiles, GPU memory."""
        from qie.core.editor import current_editor
        from qie.telemetry import metrics_view

        view = metrics_view(current_editor(), limit=0)
        view.pop("recent", None)
        return {self.ui.metrics: view}

    def fill_preset(self, key: str, language: str, price_tag: str) -> dict:
        """The preset's instruction in the chosen language; a bad price tag is a toast, the prompt stays."""
        try:
            return {self.ui.prompt: preset_prompt(key, language, price_tag)}
        except qie.QieError as exc:
            gr.Warning(explain(exc))
            return {self.ui.prompt: gr.skip()}

    def reuse(self, before_after: tuple[str | None, str | None] | None) -> dict:
        """Put the last result into the first image slot, for another edit."""
        after = before_after[1] if before_after else None
        if not after:
            gr.Warning("There is no result yet: press Edit first.")
            return {self.ui.image: gr.skip()}
        gr.Info(REPEATED_EDIT_WARNING)
        return {self.ui.image: after}

    def apply_mode(self, chosen: str) -> dict:
        """Steps and CFG that suit a mode: the few-step LoRA runs without CFG."""
        settings = FAST_MODE_SETTINGS if chosen == "fast" else self.start
        return {self.ui.steps: settings["steps"], self.ui.true_cfg_scale: settings["true_cfg_scale"]}


def _start_form(start: dict[str, Any]) -> dict[str, Any]:
    """The form fields the app's start values set (steps, CFG, max side, condition area)."""
    return {k: v for k, v in start.items() if k in FORM_FIELDS}
