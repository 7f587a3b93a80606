"""What the app's events do. Handlers take the controls' values by name and return values by component.

The edit runs in two presentations of one core: `/edit` for API callers (errors are Gradio errors,
as clients expect) and the page's Edit button (a bad input is a toast, a Cancel a neutral line in
the stats, the last result stays). No handler opens a file Gradio did not receive for the request
(`qie.app.uploads`), and every edit stops at its next step when cancelled or when its client goes
away (`qie.app.jobs`).
"""

from __future__ import annotations

import dataclasses
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
from qie.app.form import FORM_FIELDS, EditForm, build_requests
from qie.app.history import SETTINGS, record, thumbnails
from qie.app.i18n import fix_text, label, language_of, say
from qie.app.jobs import Job, SessionJobs, gradio_event, run_cancellable
from qie.app.layout import NO_FAST_LORA, Layout
from qie.app.presets import FAST_MODE_SETTINGS, preset_prompt
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
    "count": "Outputs",
    "aspect": "Aspect",
}
PRIVATE_NOTES = ("cache hit",)  # they would tell a visitor that someone else sent the same image and prompt


def explain(exc: qie.QieError, language: str = "en") -> str:
    """The error in the page's words: the control's name (in `language`), the bad value and the fix."""
    if isinstance(exc, qie.InvalidRequestError) and exc.param in CONTROL_LABELS:
        name = label(CONTROL_LABELS[exc.param], language)
        return f"{name}: {fix_text(exc.fix, language)}" if exc.value is None else f"{name}: {exc}"
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


def save_result(image: Any, metadata: dict[str, Any], seed: int, prefix: str = "qie") -> str:
    """Write the result PNG (or, with another `prefix`, an image the page shows beside it) under a
    name of its own; a full disk becomes a clear `ResourceError` and leaves no partial file."""
    from qie.core.images import save_png

    folder = output_dir()
    path = folder / f"{prefix}-{seed}-{uuid.uuid4().hex[:8]}.png"
    try:
        return str(save_png(image, path, metadata))
    except OSError as exc:
        path.with_name(path.name + ".partial").unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log.error("result not saved: disk full in %s", folder)
            raise qie.ResourceError(DISK_FULL.format(folder=folder)) from None
        raise


def run_edits(
    editor: Any, requests: list[Any], cancel: Any, on_step: Callable[[int, int], None], tag: str | None
) -> list[dict]:
    """The GPU work: one edit, or several as one batch (`Editor.edit_batch`); write each PNG (with the
    CLI's metadata) and its before image (the region tinted, when one was brushed).

    With `tag`, a single edit that fails or is blocked falls back to the price tag drawn from a template.
    """
    from qie.app.pricetag import edit_or_render
    from qie.core.metadata import png_metadata

    kwargs = {"on_step": on_step, "cancel": cancel, "timeout": LOCK_TIMEOUT_S}
    if len(requests) > 1:
        results = editor.edit_batch(requests, **kwargs)
    else:
        request = requests[0]
        results = [edit_or_render(editor, request, tag, **kwargs) if tag else editor.edit(request, **kwargs)]
    outputs = []
    for request, result in zip(requests, results, strict=True):
        png = save_result(result.image, png_metadata(editor, request, result), result.seed)
        # The before/after view gets files of its own, never PIL images: Gradio writes a PIL output to a
        # file named by its content, in place, so two requests showing the same image (the same example
        # photo, a cached result) rewrote that file while a client downloaded it, and the download
        # came back empty. Files are copied into Gradio's cache atomically, under their own names.
        before = save_result(before_image(request, result.image.size), {}, result.seed, prefix="qie-before")
        outputs.append({"before": before, "after": png, "png": png, "stats": stats_line(result)})
    return outputs


def before_image(request: Any, size: tuple[int, int]) -> Any:
    """The last input at the output's size; a brushed region shows as a red tint."""
    from PIL import Image

    before = request.images[-1].resize(size)
    if request.mask is None:
        return before
    region = request.mask.resize(size, Image.Resampling.NEAREST).point(lambda v: 96 if v >= 128 else 0)
    return Image.composite(Image.new("RGB", size, (220, 20, 60)), before, region)


class Handlers:
    """The app's event handlers around one editor factory and one layout."""

    def __init__(
        self,
        layout: Layout,
        editor_factory: Callable[[], Any],
        *,
        start: dict[str, Any],
        gpu: Callable[..., list[dict]] = run_edits,
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

        requests = self._validated(form, preprocessed)  # before touching the GPU
        progress(0, desc="getting the model ready")
        editor = self.editor_factory()
        requests, rewrite = self._rewritten(editor, form, requests, progress)
        progress(0, desc="encoding the instruction and images")

        def on_step(step: int, total: int) -> None:
            job.on_step(step, total)
            progress((step, total), desc="denoising", unit="steps")

        # A price-tag edit that fails is replaced by the tag drawn from a template (and says so).
        tag = form.price_tag if tag_in_prompt(requests[0].prompt, form.price_tag) else None
        outs = self.gpu(editor, requests, Deadline(self.edit_timeout_s(), parent=job), on_step, tag)
        return [{**out, "seed": r.seed, "rewrite": rewrite} for out, r in zip(outs, requests, strict=True)]

    def _validated(self, form: EditForm, preprocessed: bool) -> list:
        """The form's requests; a refused form is logged as one request line (outcome "invalid")."""
        try:
            if form.mode == "fast" and not self.fast_lora:
                raise qie.InvalidRequestError("mode", form.mode, NO_FAST_LORA)
            return build_requests(form, preprocessed=preprocessed)
        except qie.InvalidRequestError as exc:
            log_request("invalid", **_error_fields(exc))
            raise

    def _rewritten(
        self, editor: Any, form: EditForm, requests: list, progress: gr.Progress
    ) -> tuple[list, dict | None]:
        """The requests with the rewritten instruction when the rewrite toggle is on (reusing the
        person's edited rewrite of the same instruction); and what to show of the rewrite."""
        if not form.rewrite:
            return requests, None
        if form.prompt_to_rewrite():
            progress(0, desc="rewriting the instruction")
            started = time.perf_counter()
            text = editor.rewrite_prompt(requests[0].images, requests[0].prompt, form.language, timeout=LOCK_TIMEOUT_S)
            shown = {"text": text, "from": form.prompt, "seconds": time.perf_counter() - started}
        else:
            shown = {"text": form.rewritten.strip(), "from": form.prompt, "seconds": None}
        return [dataclasses.replace(r, prompt=shown["text"]) for r in requests], shown

    async def _run(
        self, form: EditForm, request: gr.Request | None, progress: gr.Progress, preprocessed: bool = False
    ) -> tuple[list[dict], Job]:
        key = request.session_hash if request is not None and request.session_hash else uuid.uuid4().hex
        event = gradio_event()
        with self.jobs.job(key) as job:
            if self.jobs.cancelled_since(key, getattr(event, "enqueue_time", None)):
                log_request("cancelled", stage="queue")
                raise qie.CancelledError("cancelled while waiting in the queue")
            out = await run_cancellable(lambda: self._work(form, job, progress, preprocessed), job, event)
        return out, job

    def _outputs(self, outs: list[dict]) -> dict:
        """The first result in the before/after view, download and stats (what `/edit` returns)."""
        first = outs[0]
        return {
            self.ui.result: (first["before"], first["after"]),
            self.ui.download: first["png"],
            self.ui.stats: first["stats"] if len(outs) == 1 else f"{first['stats']} | {len(outs)} outputs",
            self.ui.seed: first["seed"],
        }

    def _page_outputs(self, outs: list[dict]) -> dict:
        """`_outputs` plus the gallery of every output (shown when there are several)."""
        gallery = [(out["png"], f"seed {out['seed']}") for out in outs]
        return {
            **self._rewrite_outputs(outs[0]["rewrite"]),
            **self._outputs(outs),
            self.ui.gallery: gr.update(value=gallery, visible=len(outs) > 1, selected_index=None),
            self.ui.outputs_state: [{k: out[k] for k in ("png", "stats", "seed")} for out in outs],
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
        keep = {c: gr.skip() for c in self.page_outputs() if c is not self.ui.stats}
        try:
            out, _ = await self._run(EditForm(**values), request, progress)
        except qie.CancelledError as exc:
            if isinstance(exc, qie.EditTimeoutError):
                gr.Warning(explain(exc, language_of(request)))
            return {**keep, self.ui.stats: self._cancelled_text(request)}
        except qie.QieError as exc:
            gr.Warning(explain(exc, language_of(request)))
            return {**keep, self.ui.stats: gr.skip()}
        return self._page_outputs(out)

    def page_outputs(self) -> list[Any]:
        return [
            *self.ui.edit_outputs(),
            self.ui.gallery,
            self.ui.outputs_state,
            self.ui.rewritten,
            self.ui.rewritten_from,
        ]

    def _rewrite_outputs(self, rewrite: dict | None) -> dict:
        if rewrite is None:
            return {self.ui.rewritten: gr.skip(), self.ui.rewritten_from: gr.skip()}
        took = "your edited text" if rewrite["seconds"] is None else f"rewritten in {rewrite['seconds']:.1f}s"
        info = f"{took}; edit it and press Edit to use your text"
        return {
            self.ui.rewritten: gr.update(value=rewrite["text"], info=info, visible=True),
            self.ui.rewritten_from: rewrite["from"],
        }

    def show_rewrite(self, on: bool) -> dict:
        """The rewritten instruction's box shows while the toggle is on."""
        return {self.ui.rewritten: gr.update(visible=bool(on))}

    def pick_output(self, outputs: list[dict] | None, before_after: Any, evt: gr.SelectData) -> dict:
        """A gallery pick: that output into the before/after view, the download and the stats."""
        if not outputs or evt.index is None or evt.index >= len(outputs):
            return {self.ui.result: gr.skip(), self.ui.download: gr.skip(), self.ui.stats: gr.skip()}
        chosen = outputs[evt.index]
        before = before_after[0] if before_after else None
        return {
            self.ui.result: (before, chosen["png"]),
            self.ui.download: chosen["png"],
            self.ui.stats: chosen["stats"],
            self.ui.seed: chosen["seed"],
        }

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
        return job.progress_text(language_of(request)) if job is not None else "Cancelled."

    def cancel(self, request: gr.Request) -> dict:
        """Stop this tab's running edit at its next step; its edits still waiting are dropped."""
        key = request.session_hash or ""
        # Gradio's own cancel of the page's edit may have stopped it a moment before this runs.
        job = self.jobs.cancel(key) or self.jobs.just_stopped(key)
        if job is None:
            return {self.ui.stats: say("cancelled_none", language_of(request))}
        job.finished.wait(CANCEL_WAIT_S)  # it stops at its next step: report where
        return {self.ui.stats: job.progress_text(language_of(request))}

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
            gr.Warning(explain(exc, language))
            return {self.ui.prompt: gr.skip()}

    def reuse(self, before_after: tuple[str | None, str | None] | None, request: gr.Request | None = None) -> dict:
        """Put the last result into the first image slot, for another edit."""
        after = before_after[1] if before_after else None
        if not after:
            gr.Warning(say("no_result", language_of(request)))
            return {self.ui.image: gr.skip()}
        gr.Info(say("repeated_edit", language_of(request)))
        return {self.ui.image: after}

    def record_history(self, history: list[dict], outputs: list[dict], image: str | None, **settings: Any) -> dict:
        """Add the last edit's outputs to this tab's history."""
        entries = record(history, outputs, image, settings)
        return {self.ui.history_state: entries, self.ui.history: thumbnails(entries)}

    def restore_history(self, history: list[dict], evt: gr.SelectData) -> dict:
        """A history pick: its input image, settings and seed back in the controls, its result in view."""
        if not history or evt.index is None or evt.index >= len(history):
            return {}
        entry = history[evt.index]
        controls = {getattr(self.ui, name): value for name, value in entry["settings"].items() if value is not None}
        return {
            **controls,
            self.ui.randomize_seed: False,
            self.ui.image: entry["input"] or gr.skip(),
            self.ui.result: (entry["input"], entry["png"]),
            self.ui.download: entry["png"],
            self.ui.stats: entry["stats"],
        }

    def history_outputs(self) -> list[Any]:
        """What a history pick may set."""
        names = [*SETTINGS, "seed", "randomize_seed", "image", "result", "download", "stats"]
        return [getattr(self.ui, name) for name in names]

    def region_canvas(self, image: str | None) -> dict:
        """The region brush starts on the first image, with nothing brushed."""
        return {self.ui.mask: {"background": image, "layers": [], "composite": image} if image else None}

    def apply_mode(self, chosen: str) -> dict:
        """Steps and CFG that suit a mode: the few-step LoRA runs without CFG."""
        settings = FAST_MODE_SETTINGS if chosen == "fast" else self.start
        return {self.ui.steps: settings["steps"], self.ui.true_cfg_scale: settings["true_cfg_scale"]}


def log_request(outcome: str, **fields: Any) -> None:
    """One JSON request line for what the app ends itself (refused input, dropped waiting edit)."""
    from qie.telemetry import RequestRecord

    RequestRecord({"channel": "app"}).finish(outcome, **fields)


def _error_fields(exc: BaseException) -> dict[str, Any]:
    from qie.telemetry import error_fields

    return error_fields(exc)


def _start_form(start: dict[str, Any]) -> dict[str, Any]:
    """The form fields the app's start values set (steps, CFG, max side, condition area)."""
    return {k: v for k, v in start.items() if k in FORM_FIELDS}
