"""Build the app (`build_demo`) and serve it (`main`): flags, hardware check, warm-up, launch.

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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gradio as gr

import qie
from qie.app import handlers as app_handlers
from qie.app.form import with_form_signature
from qie.app.handlers import Handlers, run_edits
from qie.app.history import SETTINGS
from qie.app.i18n import t, translations
from qie.app.layout import Layout, build_layout
from qie.app.presets import CPU_DEMO_DEFAULTS, EDIT_DEFAULTS, FEATURES, feature_available, load_examples
from qie.core.load_options import LoadOptions
from qie.core.registry import is_tiny
from qie.settings import Settings
from qie.settings import read as read_setting

log = logging.getLogger("qie.app")

ROOT = Path(__file__).resolve().parents[2]
GPU_CONCURRENCY_ID = "gpu"
DEFAULT_QUEUE_SIZE = 20
EDIT_TIMEOUT_S = read_setting("edit_timeout_s")  # a running edit is stopped after this ($QIE_EDIT_TIMEOUT_S)
EXAMPLES_CACHE = Path(".gradio") / "cached_examples"
TINY_NOTICE = (
    "Offline demo with the tiny random model: every stage runs for real, but its edits are noise. "
    "For real edits, start the app on a CUDA GPU without --model."
)
# On a phone the result column sits below the controls: bring it into view when Edit is tapped.
SCROLL_TO_RESULT_JS = (
    "() => { if (window.innerWidth < 768) "
    "document.getElementById('results-column')?.scrollIntoView({behavior: 'smooth', block: 'start'}); }"
)
# The presets start in the browser's language.
PRESET_LANGUAGE_JS = "() => (navigator.language || '').toLowerCase().startsWith('zh') ? 'zh' : 'en'"
CSS = """
/* info texts under controls: >= 4.5:1 contrast on both themes */
.gradio-container .info-text {
  color: var(--body-text-color) !important; opacity: 1 !important;
}
"""

EditorFactory = Callable[[], Any]


def build_demo(
    editor_factory: EditorFactory,
    *,
    notice: str | None = None,
    defaults: dict[str, Any] | None = None,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    examples_dir: Path = ROOT / "examples",
    examples_cache: str | None = None,
    fast_lora: bool = False,
    metrics: bool = False,
) -> gr.Blocks:
    """The Blocks app. `editor_factory()` returns the `qie.Editor` (called at each edit; cache it).

    `notice` is shown at the top (e.g. why the real model cannot run here); `defaults` overrides the
    start values of `EDIT_DEFAULTS`. `examples_cache` names the example cache (one per model,
    revision and qie version; None runs examples on click without caching). `fast_lora` enables the
    fast-mode control; `metrics` adds the aggregate metrics panel.
    """
    start = {**EDIT_DEFAULTS, **(defaults or {})}
    with gr.Blocks(title="qie: Qwen-Image-Edit-2509", delete_cache=(3600, 3600)) as demo:
        ui = build_layout(start, notice=notice, fast_lora=fast_lora, metrics=metrics)
        handlers = Handlers(
            ui, editor_factory, start=start, gpu=_on_gpu(run_edits), edit_timeout_s=_edit_timeout, fast_lora=fast_lora
        )
        _wire_edit(ui, handlers)
        _wire_helpers(ui, handlers, fast_lora=fast_lora)
        _examples(ui, handlers, examples_dir, examples_cache)
        demo.load(None, js=PRESET_LANGUAGE_JS, outputs=[ui.language], api_visibility="private")
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    return demo


def _edit_timeout() -> float:
    return EDIT_TIMEOUT_S


def _wire_edit(ui: Layout, handlers: Handlers) -> None:
    """The Edit button and Enter (page), the `/edit` API endpoint, and Cancel."""
    # Uploads reach the handler as files, so qie reads them and a non-image gets qie's message.
    common = {"preprocess": False, "concurrency_id": GPU_CONCURRENCY_ID, "concurrency_limit": 1}
    page_event = gr.on(
        [ui.edit_btn.click, ui.prompt.submit],
        with_form_signature(handlers.edit_page),
        inputs_kwargs=ui.page_inputs(),
        outputs=handlers.page_outputs(),
        api_visibility="private",
        **common,
    )
    page_event.then(
        handlers.record_history,
        inputs_kwargs={
            "history": ui.history_state,
            "outputs": ui.outputs_state,
            "image": ui.image,
            **{name: getattr(ui, name) for name in SETTINGS},
        },
        outputs=[ui.history_state, ui.history],
        api_visibility="private",
    )
    ui.history.select(
        handlers.restore_history,
        inputs_kwargs={"history": ui.history_state},
        outputs=handlers.history_outputs(),
        api_visibility="private",
    )
    gr.on([ui.edit_btn.click, ui.prompt.submit], None, js=SCROLL_TO_RESULT_JS, api_visibility="private")
    api_trigger = gr.Button(visible=False, elem_id="api-edit")
    api_trigger.click(
        with_form_signature(handlers.edit_api),
        inputs_kwargs=ui.edit_inputs(),
        outputs=ui.edit_outputs(),
        api_name="edit",
        **common,
    )
    ui.cancel_btn.click(
        handlers.cancel, inputs=None, outputs=[ui.stats], cancels=[page_event], queue=False, api_name="cancel"
    )


def _wire_helpers(ui: Layout, handlers: Handlers, *, fast_lora: bool) -> None:
    """Presets, "use as input", the mode switch and the metrics panel."""
    for key, button in ui.preset_buttons.items():
        button.click(
            lambda language, price_tag, key=key: handlers.fill_preset(key, language, price_tag),
            inputs_kwargs={"language": ui.language, "price_tag": ui.price_tag},
            outputs=[ui.prompt],
            api_visibility="private",  # queued (not on the GPU's queue): a bad price tag shows as a toast
        )
    ui.gallery.select(
        handlers.pick_output,
        inputs_kwargs={"outputs": ui.outputs_state, "before_after": ui.result},
        outputs=[ui.result, ui.download, ui.stats, ui.seed],
        api_visibility="private",
    )
    ui.image.change(
        handlers.region_canvas, inputs_kwargs={"image": ui.image}, outputs=[ui.mask], api_visibility="private"
    )
    ui.rewrite.change(
        handlers.show_rewrite, inputs_kwargs={"on": ui.rewrite}, outputs=[ui.rewritten], api_visibility="private"
    )
    ui.use_as_input.click(
        handlers.reuse, inputs_kwargs={"before_after": ui.result}, outputs=[ui.image], api_visibility="private"
    )
    if fast_lora and feature_available(FEATURES["mode"]):
        ui.mode.change(
            handlers.apply_mode,
            inputs_kwargs={"chosen": ui.mode},
            outputs=[ui.steps, ui.true_cfg_scale],
            api_visibility="private",
        )
    if ui.refresh_metrics is not None:
        ui.refresh_metrics.click(handlers.show_metrics, outputs=[ui.metrics], queue=False, api_name="metrics")


@contextmanager
def _examples_cache_folder(name: str | None) -> Iterator[None]:
    """Gradio reads its example-cache folder from the environment when `gr.Examples` is built."""
    if name is None:
        yield
        return
    before = os.environ.get("GRADIO_EXAMPLES_CACHE")
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(EXAMPLES_CACHE / name)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("GRADIO_EXAMPLES_CACHE", None)
        else:
            os.environ["GRADIO_EXAMPLES_CACHE"] = before


def examples_cache_name(model: str, revision: str | None) -> str | None:
    """The example cache of `model` at `revision` with this qie version; None (no cache) for tiny.

    Example:
        >>> examples_cache_name("Qwen/Qwen-Image-Edit-2509", None)
        'Qwen--Qwen-Image-Edit-2509@main-qie0.1.0'
    """
    if is_tiny(model):
        return None
    slug = model.strip("/").replace("/", "--").replace(os.sep, "--")
    return f"{slug}@{revision or 'main'}-qie{qie.__version__}"


def _examples(ui: Layout, handlers: Handlers, folder: Path, cache: str | None) -> None:
    """The shipped examples, with English and with Chinese instructions."""
    examples = load_examples(folder)
    if not examples:
        return
    sets = {
        "Examples (CC0 / public-domain photos)": [[str(e.image), e.prompt] for e in examples],
        "Examples in Chinese": [[str(e.image), e.prompt_zh] for e in examples],
    }
    with _examples_cache_folder(cache):
        for label, rows in sets.items():
            gr.Examples(
                examples=rows,
                inputs=[ui.image, ui.prompt],
                outputs=ui.edit_outputs(),
                fn=handlers.edit_example,
                cache_examples=cache is not None,
                cache_mode="lazy",
                run_on_click=cache is None,
                label=t(label),
            )


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
    return spaces.GPU(duration=read_setting("gpu_duration_s"))(fn)


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
        "css": CSS,
        "i18n": translations(),
    }


def startup_notice(model: str, device: str | None = None) -> str | None:
    """Why `model` cannot run on this machine (no GPU), in the app's flags; None if it can."""
    from qie.core.models import check_hardware, resolve_device
    from qie.core.registry import resolve_model

    if device is not None:
        return None
    try:
        resolved = resolve_model(model)
        check_hardware(resolved, resolve_device())
    except qie.InvalidRequestError as exc:
        return f"{exc} {app_handlers.TINY_HINT}"
    except qie.ResourceError:
        spec = resolved.spec
        return (
            f"The model {model} needs a CUDA GPU (its weights are {spec.weights_gib():.0f} GiB in bf16) and none "
            f"was found. Start the app on a GPU machine, or with --device cpu to try anyway (very slow, "
            f"~{spec.weights_gib(4):.0f} GiB of RAM). {app_handlers.TINY_HINT}"
        )
    return None


def build_parser(settings: Settings | None = None) -> argparse.ArgumentParser:
    """The app's flags; engine flags default to the `QIE_*` variables in `settings` (read now when None)."""
    settings = settings if settings is not None else Settings.from_env()
    on_space = bool(os.environ.get("SPACE_ID"))  # set by Hugging Face Spaces
    parser = argparse.ArgumentParser(description="The qie web app (Gradio).")
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
        "--metrics", action="store_true", help="show a panel of aggregate figures (counts, latency, GPU memory)"
    )
    parser.add_argument(
        "--preload",
        action="store_true",
        default=on_space or settings.preload,
        help="load the model and run a small warm-up edit before serving (default on a Space)",
    )
    # The app offers both modes, so a fast LoRA stays a switchable adapter: no --fast-fuse here.
    LoadOptions.add_arguments(parser, LoadOptions.from_env(settings, fast_fuse=False), skip=("fast_fuse",))
    return parser


def warm_up(editor: Any) -> None:
    """One small edit, so the first user does not pay for lazy initialisation."""
    start = time.perf_counter()
    request = qie.EditRequest(
        images=[ROOT / "examples" / "coffee-cup.jpg"], prompt="warm up", steps=2, seed=0, max_side=256
    )
    editor.edit(request)
    log.info("warm-up edit took %.1fs", time.perf_counter() - start)


def _editor_factory(options: LoadOptions) -> EditorFactory:
    def editor_factory() -> Any:
        return qie.get_editor(options)

    return editor_factory


def main(argv: list[str] | None = None) -> None:
    """Parse flags, check the hardware, build the app and serve it."""
    _spaces()
    try:
        parser = build_parser()
    except qie.QieError as exc:  # a bad QIE_* variable: the message names it
        raise SystemExit(f"error: {exc}") from None
    args = parser.parse_args(argv)
    from qie.core.models import prefer_expandable_segments

    prefer_expandable_segments()
    if args.mcp and importlib.util.find_spec("mcp") is None:
        parser.error('--mcp needs the MCP extra: pip install "gradio[mcp]==6.31.0"')
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from qie.telemetry import install_redaction

    install_redaction()
    options = LoadOptions.from_args(args)
    model = options.model
    notice = startup_notice(model, options.device)
    if notice:
        log.warning(notice)
    editor_factory = _editor_factory(options)
    if args.preload and not notice:
        editor = editor_factory()  # on ZeroGPU the weights must be placed at start-up, outside GPU functions
        if not _on_zero_gpu():
            warm_up(editor)
    tiny = is_tiny(model)
    demo = build_demo(
        editor_factory,
        notice=TINY_NOTICE if tiny else notice,
        defaults=CPU_DEMO_DEFAULTS if tiny else None,  # small and quick: its edits are noise anyway
        queue_size=args.queue_size,
        examples_cache=examples_cache_name(" + ".join([model, *options.loras]), options.revision),
        fast_lora=bool(args.fast_lora),
        metrics=args.metrics,
    )
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
