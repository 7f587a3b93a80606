"""The qie web app: upload 1-3 photos, describe the edit (or pick an e-commerce preset), compare before/after.

Run it:
    python app.py --model tiny            # offline demo with the tiny random model (CPU is fine)
    python app.py                         # the real Qwen-Image-Edit-2509 on a CUDA GPU

On a Hugging Face Space it binds 0.0.0.0 and reads QIE_MODEL; with the `spaces` package installed
the GPU function runs under ZeroGPU. Importing this module loads neither torch nor the model.

Example (tests):
    >>> demo = build_demo(lambda: qie.Editor.load("tiny"))      # doctest: +SKIP
    >>> demo.launch(prevent_thread_lock=True)                   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

import qie
from qie.app.presets import (
    CPU_DEMO_DEFAULTS,
    DEFAULT_PRICE_TAG,
    EDIT_DEFAULTS,
    FAST_MODE_SETTINGS,
    FEATURES,
    LANGUAGES,
    PRESETS,
    REPEATED_EDIT_WARNING,
    Feature,
    feature_available,
    feature_request_fields,
    load_examples,
    preset_prompt,
    unavailable_note,
)
from qie.app.pricetag import tag_in_prompt
from qie.serving.jobs import CancelBoard, Deadline

log = logging.getLogger("qie.app")

ROOT = Path(__file__).resolve().parent
GPU_CONCURRENCY_ID = "gpu"
DEFAULT_QUEUE_SIZE = 20
LOCK_TIMEOUT_S = 600.0  # how long a dequeued edit waits for the editor (e.g. behind an example being cached)
OUTPUT_TTL_S = 3600.0  # downloaded PNGs are kept this long
EDIT_TIMEOUT_S = float(os.environ.get("QIE_EDIT_TIMEOUT_S", "900"))  # a running edit is stopped after this
TINY_NOTICE = (
    "Offline demo with the tiny random model: every stage runs for real, but its edits are noise. "
    "For real edits, start the app on a CUDA GPU without --model."
)
TINY_HINT = "To try the app without a GPU, start the offline demo: python app.py --model tiny"

EditorFactory = Callable[[], Any]
Upload = dict[str, Any] | str | None  # Gradio's FileData dict (unprocessed event) or a path


def _upload_path(upload: dict[str, Any] | str) -> str:
    return upload["path"] if isinstance(upload, dict) else upload


def _number(name: str, value: Any, kind: type[int] | type[float]) -> int | float:
    """A control's value as `kind` (sliders may send 40.0); EditRequest checks the range."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise qie.InvalidRequestError(name, value, "give a number") from None
    if kind is int and not number.is_integer():
        raise qie.InvalidRequestError(name, value, "give a whole number")
    return kind(number)


def build_demo(
    editor_factory: EditorFactory,
    *,
    notice: str | None = None,
    defaults: dict[str, Any] | None = None,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    examples_dir: Path = ROOT / "examples",
) -> gr.Blocks:
    """The Blocks app. `editor_factory()` returns the `qie.Editor` (called at each edit; cache it).

    `notice` is shown at the top (e.g. why the real model cannot run here); `defaults` overrides
    the starting values of `EDIT_DEFAULTS` (steps, true_cfg_scale, max_side, condition_area).
    """
    start = {**EDIT_DEFAULTS, **(defaults or {})}
    board = CancelBoard()
    run_edit = _on_gpu(_run_edit)

    with gr.Blocks(title="qie: Qwen-Image-Edit-2509", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# qie: instruction-based image editing\n"
            "Upload a photo, describe the change or pick a preset, press **Edit**. "
            "Model: [Qwen-Image-Edit-2509](https://huggingface.co/Qwen/Qwen-Image-Edit-2509)."
        )
        if notice:
            gr.Markdown(f"**{notice}**", elem_id="notice")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="Image", type="filepath", height=320, elem_id="image-1")
                with gr.Accordion("More images (optional, up to 3 in all)", open=False), gr.Row():
                    image_2 = gr.Image(label="Image 2", type="filepath", height=200, elem_id="image-2")
                    image_3 = gr.Image(label="Image 3", type="filepath", height=200, elem_id="image-3")
                prompt = gr.Textbox(
                    label="Instruction",
                    placeholder="e.g. Replace the background with pure white (Enter to edit)",
                    lines=1,  # one line: Enter submits (Shift+Enter on a multi-line box)
                    max_lines=6,
                    elem_id="prompt",
                )
                with gr.Accordion("E-commerce presets (fill the instruction)", open=True, elem_id="presets"):
                    with gr.Row():
                        language = gr.Radio(
                            [(label, code) for code, label in LANGUAGES.items()],
                            value="en",
                            label="Language",
                            elem_id="language",
                        )
                        price_tag = gr.Textbox(value=DEFAULT_PRICE_TAG, label="Price tag text", elem_id="price-tag")
                    with gr.Row():
                        preset_buttons = {
                            key: gr.Button(p.label, size="sm", variant="secondary", elem_id=f"preset-{key}")
                            for key, p in PRESETS.items()
                        }
                with gr.Row():
                    edit_btn = gr.Button("Edit", variant="primary", elem_id="edit-btn")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-btn")
                with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                    mode = _feature_control(FEATURES["mode"])
                    steps = gr.Slider(2, 100, value=start["steps"], step=1, label="Steps", elem_id="steps")
                    true_cfg_scale = gr.Slider(
                        1.0,
                        20.0,
                        value=start["true_cfg_scale"],
                        step=0.1,
                        label="True CFG scale (1 = off, 2x faster)",
                        elem_id="cfg",
                    )
                    negative_prompt = gr.Textbox(value=" ", label="Negative prompt", elem_id="negative-prompt")
                    with gr.Row():
                        seed_box = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="seed")
                        randomize_seed = gr.Checkbox(value=True, label="Randomize seed", elem_id="randomize-seed")
                    max_side = gr.Slider(
                        0,
                        2048,
                        value=start["max_side"],
                        step=32,
                        label="Longest output side (px; 0 = auto, ~1 megapixel)",
                        elem_id="max-side",
                    )
                    with gr.Row():
                        resize_to_input = gr.Checkbox(
                            value=False, label="Return at the input's size", elem_id="resize-to-input"
                        )
                        condition_area = gr.Radio(
                            [("model (~1024²)", "model"), ("output (faster when small)", "output")],
                            value=start["condition_area"],
                            label="Encode the input images at",
                            elem_id="condition-area",
                        )
                    tile_size = _feature_control(FEATURES["tile_size"])
                    attention_quant = _feature_control(FEATURES["attention_quant"])
                    early_exit = _feature_control(FEATURES["early_exit"])
            with gr.Column(scale=1):
                result = gr.ImageSlider(
                    label="Before / after",
                    type="filepath",
                    format="png",
                    height=420,
                    interactive=False,
                    elem_id="result",
                )
                stats = gr.Textbox(label="Stats", interactive=False, elem_id="stats")
                with gr.Row():
                    download = gr.DownloadButton("Download PNG", elem_id="download")
                    use_as_input = gr.Button("Use as input", elem_id="use-as-input")
                with gr.Accordion("Metrics (recent edits)", open=False, elem_id="metrics-panel"):
                    metrics = gr.JSON(label="Latency, GPU memory, last edits", elem_id="metrics")
                    refresh_metrics = gr.Button("Refresh", size="sm", elem_id="metrics-refresh")

        edit_inputs = {
            "image": image,
            "image_2": image_2,
            "image_3": image_3,
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "steps": steps,
            "true_cfg_scale": true_cfg_scale,
            "seed": seed_box,
            "randomize_seed": randomize_seed,
            "max_side": max_side,
            "resize_to_input": resize_to_input,
            "condition_area": condition_area,
            "mode": mode,
            "tile_size": tile_size,
            "attention_quant": attention_quant,
            "early_exit": early_exit,
            "price_tag": price_tag,
        }
        edit_outputs = [result, download, stats, seed_box]

        def edit(
            image: Upload,
            prompt: str,
            image_2: Upload = None,
            image_3: Upload = None,
            negative_prompt: str = " ",
            steps: float = start["steps"],
            true_cfg_scale: float = start["true_cfg_scale"],
            seed: float | None = 0,
            randomize_seed: bool = True,
            max_side: float = start["max_side"],
            resize_to_input: bool = False,
            condition_area: str = start["condition_area"],
            mode: str = FEATURES["mode"].default,
            tile_size: str = FEATURES["tile_size"].default,
            attention_quant: str = FEATURES["attention_quant"].default,
            early_exit: bool = FEATURES["early_exit"].default,
            price_tag: str = "",
            request: gr.Request | None = None,
            progress: gr.Progress = gr.Progress(),  # noqa: B008  (Gradio's way to ask for a progress bar)
        ) -> dict:
            """Edit 1-3 images with an instruction; returns before/after, the PNG, stats and the seed used."""
            features = {
                "mode": mode,
                "tile_size": tile_size,
                "attention_quant": attention_quant,
                "early_exit": early_exit,
            }
            images = [_upload_path(upload) for upload in (image, image_2, image_3) if upload]
            try:
                params = {
                    "prompt": prompt,
                    "negative_prompt": negative_prompt,
                    "steps": _number("steps", steps, int),
                    "true_cfg_scale": _number("true_cfg_scale", true_cfg_scale, float),
                    "seed": None if randomize_seed or seed is None else _number("seed", seed, int),
                    "max_side": _number("max_side", max_side or 0, int) or None,  # 0 = automatic size
                    "resize_to_input": bool(resize_to_input),
                    "condition_area": condition_area,
                    **feature_request_fields(features),
                }
                edit_request = qie.EditRequest(images=images, **params)  # validate before touching the GPU
                progress(0, desc="getting the model ready")
                editor = editor_factory()
                progress(0, desc="encoding the instruction and images")
                key = request.session_hash if request is not None and request.session_hash else uuid.uuid4().hex
                # A price-tag edit that fails is replaced by the tag drawn from a template (and says so).
                tag = price_tag if tag_in_prompt(edit_request.prompt, price_tag) else None
                with board.job(key) as cancel:
                    deadline = Deadline(EDIT_TIMEOUT_S, parent=cancel)
                    out = run_edit(editor, edit_request, deadline, _progress_steps(progress), tag)
            except qie.QieError as exc:
                raise gr.Error(_explain(exc), print_exception=False) from exc
            for note in out["notes"]:
                gr.Warning(note)
            return {
                result: (out["before"], out["after"]),
                download: out["png"],
                stats: out["stats"],
                seed_box: edit_request.seed,
            }

        edit_event = gr.on(
            [edit_btn.click, prompt.submit],
            edit,
            inputs_kwargs=edit_inputs,
            outputs=edit_outputs,
            api_name="edit",
            # Uploads reach the handler as files, so qie reads them and a non-image gets qie's message.
            preprocess=False,
            concurrency_id=GPU_CONCURRENCY_ID,
            concurrency_limit=1,
        )

        def cancel(request: gr.Request) -> dict:
            """Stop the running edit of this browser tab at its next step (a queued one is dropped)."""
            stopped = board.cancel(request.session_hash or "")
            if stopped:
                return {stats: "Cancelled: the edit stops at its next step and frees the GPU."}
            return {stats: "Cancelled: no edit of yours was running (a waiting one is dropped)."}

        def show_metrics() -> dict:
            """Recent latencies (p50/p95), peak GPU memory and the last edits."""
            from qie.core.editor import current_editor
            from qie.telemetry import metrics_view

            return {metrics: metrics_view(current_editor())}

        refresh_metrics.click(show_metrics, outputs=[metrics], queue=False, api_name="metrics")

        cancel_btn.click(cancel, inputs=None, outputs=[stats], cancels=[edit_event], queue=False, api_name="cancel")

        def fill_preset(key: str, language: str, price_tag: str) -> dict:
            try:
                return {prompt: preset_prompt(key, language, price_tag)}
            except qie.QieError as exc:
                raise gr.Error(str(exc), print_exception=False) from exc

        for key, button in preset_buttons.items():
            button.click(
                lambda language, price_tag, key=key: fill_preset(key, language, price_tag),
                inputs_kwargs={"language": language, "price_tag": price_tag},
                outputs=[prompt],
                queue=False,
                api_visibility="private",
            )

        def reuse(before_after: tuple[str | None, str | None] | None) -> dict:
            """Put the last result into the first image slot, for another edit."""
            after = before_after[1] if before_after else None
            if not after:
                raise gr.Error("There is no result yet: run an edit first.", print_exception=False)
            gr.Warning(REPEATED_EDIT_WARNING)
            return {image: after}

        use_as_input.click(reuse, inputs_kwargs={"before_after": result}, outputs=[image], api_visibility="private")

        def apply_mode(chosen: str) -> dict:
            """Steps and CFG that suit a mode: the few-step LoRA runs without CFG."""
            settings = FAST_MODE_SETTINGS if chosen == "fast" else start
            return {steps: settings["steps"], true_cfg_scale: settings["true_cfg_scale"]}

        if feature_available(FEATURES["mode"]):
            mode.change(
                apply_mode, inputs_kwargs={"chosen": mode}, outputs=[steps, true_cfg_scale], api_visibility="private"
            )

        examples = load_examples(examples_dir)
        if examples:
            gr.Examples(
                examples=[[str(e.image), e.prompt] for e in examples],
                inputs=[image, prompt],
                outputs=edit_outputs,
                fn=lambda image, prompt: edit(image, prompt, randomize_seed=False),
                cache_examples=True,
                cache_mode="lazy",
                label="Examples (CC0 / public-domain photos)",
            )

    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    return demo


def _feature_control(feature: Feature) -> gr.components.Component:
    """A control for `feature`: live when the build supports it, otherwise disabled and saying so."""
    live = feature_available(feature)
    kwargs = {
        "value": feature.default,
        "label": feature.label,
        "info": feature.info if live else unavailable_note(feature),
        "interactive": live,
        "elem_id": f"feature-{feature.name.replace('_', '-')}",
    }
    if feature.choices is None:
        return gr.Checkbox(**kwargs)
    return gr.Radio(list(feature.choices), **kwargs)


def _progress_steps(progress: gr.Progress) -> Callable[[int, int], None]:
    def on_step(step: int, total: int) -> None:
        progress((step, total), desc="denoising", unit="steps")

    return on_step


def _run_edit(
    editor: Any, request: Any, cancel: Any, on_step: Callable[[int, int], None], tag: str | None = None
) -> dict[str, Any]:
    """The GPU work of one edit: run it, write the PNG (with the CLI's metadata) and the before image.

    With `tag`, a failed or blocked edit falls back to the price tag drawn from a template.
    """
    from qie.app.pricetag import edit_or_render
    from qie.core.images import save_png
    from qie.core.metadata import png_metadata

    kwargs = {"on_step": on_step, "cancel": cancel, "timeout": LOCK_TIMEOUT_S}
    result = edit_or_render(editor, request, tag, **kwargs) if tag else editor.edit(request, **kwargs)
    out_dir = _output_dir()
    png = save_png(
        result.image, out_dir / f"qie-{result.seed}-{uuid.uuid4().hex[:8]}.png", png_metadata(editor, request, result)
    )
    before = request.images[-1].resize(result.image.size)
    return {"before": before, "after": result.image, "png": str(png), "stats": _stats(result), "notes": result.notes}


def _stats(result: Any) -> str:
    notes = "".join(f" | {note}" for note in result.notes)
    return f"{result.summary()} | output {result.image.width}x{result.image.height}{notes}"


def _output_dir() -> Path:
    """Where result PNGs are written; files older than `OUTPUT_TTL_S` are removed on the way."""
    folder = Path(tempfile.gettempdir()) / "qie-app"
    folder.mkdir(exist_ok=True)
    cutoff = time.time() - OUTPUT_TTL_S
    for old in folder.glob("*.png"):
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:  # removed meanwhile by another request
            continue
    return folder


def _explain(exc: qie.QieError) -> str:
    """The error's own message, plus how to start the offline demo when the hardware is the problem."""
    if isinstance(exc, qie.ResourceError):
        return f"{exc} {TINY_HINT}"
    if isinstance(exc, qie.BusyError):
        return f"The app is busy: {exc}"
    return str(exc)


def _spaces() -> Any | None:
    """The Hugging Face `spaces` package when installed (it must be imported before torch on ZeroGPU)."""
    try:
        import spaces
    except ImportError:
        return None
    return spaces


def _on_zero_gpu() -> bool:
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def _on_gpu(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` under ZeroGPU's `spaces.GPU` when the `spaces` package is installed, else `fn` itself."""
    spaces = _spaces()
    if spaces is None:
        return fn
    return spaces.GPU(duration=int(os.environ.get("QIE_GPU_DURATION", "120")))(fn)


def launch_options(current_editor: Callable[[], Any | None]) -> dict[str, Any]:
    """Serving settings for `demo.launch` (used by `main` and the tests): the upload size limit
    (qie's input file limit) and a `/health` readiness route reporting `current_editor()`."""
    from fastapi.routing import APIRoute

    from qie.core.images import max_input_bytes

    def health() -> dict[str, Any]:
        from qie.telemetry import health

        return health(current_editor())

    return {
        "max_file_size": max_input_bytes(),
        "app_kwargs": {"routes": [APIRoute("/health", health, methods=["GET"])]},
    }


def startup_notice(model: str, device: str | None = None) -> str | None:
    """Why `model` cannot run on this machine (no GPU), with the way to the offline demo; None if it can."""
    from qie.core.models import MODELS, check_hardware, resolve_device

    if device is not None:
        return None
    try:
        check_hardware(MODELS.get(model), resolve_device())
    except qie.ResourceError as exc:
        return f"{exc} {TINY_HINT}"
    return None


def build_parser() -> argparse.ArgumentParser:
    on_space = bool(os.environ.get("SPACE_ID"))
    parser = argparse.ArgumentParser(description="The qie web app (Gradio).")
    parser.add_argument(
        "--model",
        default=os.environ.get("QIE_MODEL"),
        help="hub id, local folder or 'tiny' (default: $QIE_MODEL, else Qwen/Qwen-Image-Edit-2509)",
    )
    parser.add_argument("--device", default=os.environ.get("QIE_DEVICE"), help="cuda, cuda:1, cpu (default: auto)")
    parser.add_argument(
        "--host",
        default="0.0.0.0" if on_space else os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="address to bind (default 127.0.0.1; 0.0.0.0 on a Space)",
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--mcp", action="store_true", help="also serve the edit endpoint as an MCP tool")
    parser.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE, help="waiting edits before 'busy'")
    parser.add_argument(
        "--preload",
        action="store_true",
        default=on_space or os.environ.get("QIE_PRELOAD") == "1",
        help="load the model and run a small warm-up edit before serving (default on a Space)",
    )
    engine = parser.add_argument_group("engine (see README: Memory plans, Speed options)")
    engine.add_argument("--plan", default=os.environ.get("QIE_PLAN", "auto"), help="memory plan (default: auto)")
    engine.add_argument("--vram-budget", type=float, help="GiB of GPU memory the plan may use (default: free VRAM)")
    engine.add_argument("--compile", action="store_true", help="regional torch.compile + warm-up (CUDA)")
    engine.add_argument(
        "--fast-lora",
        default=os.environ.get("QIE_FAST_LORA"),
        help="Lightning LoRA file/folder/hub id: enables the app's fast mode (as an adapter, so quality stays)",
    )
    engine.add_argument("--fast-steps", type=int, choices=[4, 8], default=8)
    return parser


def warm_up(editor: Any) -> None:
    """One small edit, so the first user does not pay for lazy initialisation."""
    start = time.perf_counter()
    request = qie.EditRequest(
        images=[ROOT / "examples" / "coffee-cup.jpg"], prompt="warm up", steps=2, seed=0, max_side=256
    )
    editor.edit(request)
    log.info("warm-up edit took %.1fs", time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    """Parse flags, check the hardware, build the app and serve it."""
    _spaces()
    parser = build_parser()
    args = parser.parse_args(argv)
    from qie.core.models import prefer_expandable_segments

    prefer_expandable_segments()
    if args.mcp and importlib.util.find_spec("mcp") is None:
        parser.error('--mcp needs the MCP extra: pip install "gradio[mcp]==6.31.0"')
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from qie.telemetry import install_redaction

    install_redaction()
    from qie.core.models import REAL_MODEL_ID

    model = args.model or REAL_MODEL_ID
    notice = startup_notice(model, args.device)
    if notice:
        log.warning(notice)

    def editor_factory() -> Any:
        return qie.get_editor(
            model,
            device=args.device,
            plan=args.plan,
            vram_budget_gib=args.vram_budget,
            compile=args.compile,
            fast_lora=args.fast_lora,
            fast_steps=args.fast_steps,
            fast_fuse=False,  # the app offers both modes: keep the LoRA as a switchable adapter
        )

    if args.preload and not notice:
        editor = editor_factory()  # on ZeroGPU the weights must be placed at start-up, outside GPU functions
        if not _on_zero_gpu():
            warm_up(editor)
    defaults = None
    if model == "tiny":
        defaults = CPU_DEMO_DEFAULTS  # small and quick: its edits are noise anyway
        notice = TINY_NOTICE
    demo = build_demo(editor_factory, notice=notice, defaults=defaults, queue_size=args.queue_size)
    from qie.core.editor import current_editor

    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        mcp_server=args.mcp or None,
        prevent_thread_lock=True,
        **launch_options(current_editor),
    )
    if args.mcp and getattr(demo, "mcp_error", None):
        log.warning("the MCP server did not start: %s", demo.mcp_error)
    demo.block_thread()


if __name__ == "__main__":
    main()
