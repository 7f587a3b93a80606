"""The app's components and where they sit; no behaviour here (see `qie.app.handlers`).

Every control a test or a person's script may reach has an `elem_id`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from qie.app.form import API_FIELDS, ASPECTS, FORM_FIELDS, MAX_OUTPUTS
from qie.app.i18n import INTRO, t
from qie.app.presets import (
    DEFAULT_PRICE_TAG,
    FEATURES,
    LANGUAGES,
    PRESETS,
    Feature,
    feature_available,
    unavailable_note,
)

NO_FAST_LORA = "start the app with --fast-lora FILE (a Lightning LoRA) to enable fast mode"


@dataclass
class Layout:
    """The components the handlers read and write."""

    image: gr.Image
    image_2: gr.Image
    image_3: gr.Image
    prompt: gr.Textbox
    language: gr.Radio
    price_tag: gr.Textbox
    preset_buttons: dict[str, gr.Button]
    edit_btn: gr.Button
    cancel_btn: gr.Button
    mode: Any
    steps: gr.Slider
    true_cfg_scale: gr.Slider
    negative_prompt: gr.Textbox
    seed: gr.Number
    randomize_seed: gr.Checkbox
    max_side: gr.Slider
    resize_to_input: gr.Checkbox
    condition_area: gr.Radio
    tile_size: Any
    attention_quant: Any
    early_exit: Any
    result: gr.ImageSlider
    stats: gr.Textbox
    download: gr.DownloadButton
    use_as_input: gr.Button
    metrics: gr.JSON | None
    refresh_metrics: gr.Button | None
    count: gr.Slider
    aspect: gr.Radio
    mask: gr.ImageEditor
    gallery: gr.Gallery
    outputs_state: gr.State
    rewrite: gr.Checkbox
    rewritten: gr.Textbox
    rewritten_from: gr.State
    history: gr.Gallery
    history_state: gr.State

    def edit_inputs(self) -> dict[str, Any]:
        """The edit's inputs by parameter name, in the `/edit` API's order."""
        return {name: getattr(self, name) for name in API_FIELDS}

    def page_inputs(self) -> dict[str, Any]:
        """The Edit button's inputs: the API's and the page's own (outputs, aspect, region)."""
        return {name: getattr(self, name) for name in FORM_FIELDS}

    def edit_outputs(self) -> list[Any]:
        return [self.result, self.download, self.stats, self.seed]


def feature_control(feature: Feature, *, unavailable: str | None = None) -> Any:
    """A control for `feature`: live when the build (and the app's start flags) support it, else
    disabled and saying why. `unavailable` names what the app must be started with."""
    built = feature_available(feature)
    live = built and unavailable is None
    info = feature.info if live else unavailable if built else unavailable_note(feature)
    kwargs = {
        "value": feature.default,
        "label": t(feature.label),
        "info": info,
        "interactive": live,
        "elem_id": f"feature-{feature.name.replace('_', '-')}",
    }
    if feature.choices is None:
        return gr.Checkbox(**kwargs)
    return gr.Radio(list(feature.choices), **kwargs)


def _images() -> dict[str, Any]:
    image = gr.Image(label=t("Image"), type="filepath", height=320, elem_id="image-1")
    with gr.Accordion(t("More images (optional, up to 3 in all)"), open=False), gr.Row():
        image_2 = gr.Image(label=t("Image 2"), type="filepath", height=200, elem_id="image-2")
        image_3 = gr.Image(label=t("Image 3"), type="filepath", height=200, elem_id="image-3")
    with gr.Accordion(t("Region (optional): brush where the edit goes"), open=False, elem_id="region"):
        mask = gr.ImageEditor(
            label=t("Brush the region on the image; outside it the photo stays exactly as it is"),
            type="filepath",
            sources=(),
            transforms=(),
            layers=False,
            brush=gr.Brush(colors=["#e0143c"], default_size=24, color_mode="fixed"),
            eraser=gr.Eraser(default_size=24),
            height=320,
            elem_id="mask",
        )
    return {"image": image, "image_2": image_2, "image_3": image_3, "mask": mask}


def _prompt_and_presets() -> dict[str, Any]:
    prompt = gr.Textbox(
        label=t("Instruction"),
        placeholder=t("e.g. Replace the background with pure white (Enter to edit)"),
        lines=1,  # one line: Enter submits (Shift+Enter on a multi-line box)
        max_lines=6,
        elem_id="prompt",
    )
    rewrite = gr.Checkbox(
        value=False,
        label=t("Rewrite the instruction first"),
        info="the text encoder (Qwen2.5-VL) writes a precise instruction from yours, looking at the images",
        elem_id="rewrite",
    )
    rewritten = gr.Textbox(label=t("Rewritten instruction"), lines=2, visible=False, elem_id="rewritten")
    with gr.Accordion(t("E-commerce presets (fill the instruction)"), open=True, elem_id="presets"):
        with gr.Row():
            language = gr.Radio(
                [(label, code) for code, label in LANGUAGES.items()],
                value="en",
                label=t("Language"),
                elem_id="language",
            )
            price_tag = gr.Textbox(value=DEFAULT_PRICE_TAG, label=t("Price tag text"), elem_id="price-tag")
        with gr.Row():
            buttons = {
                key: gr.Button(t(p.label), size="sm", variant="secondary", elem_id=f"preset-{key}")
                for key, p in PRESETS.items()
            }
    with gr.Row():
        count = gr.Slider(
            1, MAX_OUTPUTS, value=1, step=1, label=t("Outputs (consecutive seeds, one batch)"), elem_id="count"
        )
        aspect = gr.Radio(
            [("keep input", "keep"), *((name, name) for name in ASPECTS if name != "keep")],
            value="keep",
            label=t("Aspect"),
            elem_id="aspect",
        )
    with gr.Row():
        edit_btn = gr.Button(t("Edit"), variant="primary", elem_id="edit-btn")
        cancel_btn = gr.Button(t("Cancel"), variant="secondary", elem_id="cancel-btn")
    return {
        "rewrite": rewrite,
        "rewritten": rewritten,
        "rewritten_from": gr.State(""),
        "count": count,
        "aspect": aspect,
        "prompt": prompt,
        "language": language,
        "price_tag": price_tag,
        "preset_buttons": buttons,
        "edit_btn": edit_btn,
        "cancel_btn": cancel_btn,
    }


def _advanced(start: dict[str, Any], fast_lora: bool) -> dict[str, Any]:
    with gr.Accordion(t("Advanced"), open=False, elem_id="advanced"):
        mode = feature_control(FEATURES["mode"], unavailable=None if fast_lora else NO_FAST_LORA)
        steps = gr.Slider(2, 100, value=start["steps"], step=1, label=t("Steps"), elem_id="steps")
        cfg = gr.Slider(
            1.0,
            20.0,
            value=start["true_cfg_scale"],
            step=0.1,
            label=t("True CFG scale (1 = off, 2x faster)"),
            elem_id="cfg",
        )
        negative_prompt = gr.Textbox(value=" ", label=t("Negative prompt"), elem_id="negative-prompt")
        with gr.Row():
            seed = gr.Number(value=0, precision=0, minimum=0, label=t("Seed"), elem_id="seed")
            randomize_seed = gr.Checkbox(value=True, label=t("Randomize seed"), elem_id="randomize-seed")
        max_side = gr.Slider(
            0,
            2048,
            value=start["max_side"],
            step=32,
            label=t("Longest output side (px; 0 = auto, ~1 megapixel)"),
            elem_id="max-side",
        )
        with gr.Row():
            resize_to_input = gr.Checkbox(value=False, label=t("Return at the input's size"), elem_id="resize-to-input")
            condition_area = gr.Radio(
                [
                    ("auto (output under 0.6 MP)", "auto"),
                    ("model (~1024²)", "model"),
                    ("output (faster when small)", "output"),
                ],
                value=start["condition_area"],
                label=t("Encode the input images at"),
                elem_id="condition-area",
            )
        features = {name: feature_control(FEATURES[name]) for name in ("tile_size", "attention_quant", "early_exit")}
    return {
        "mode": mode,
        "steps": steps,
        "true_cfg_scale": cfg,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "randomize_seed": randomize_seed,
        "max_side": max_side,
        "resize_to_input": resize_to_input,
        "condition_area": condition_area,
        **features,
    }


def _results(metrics: bool) -> dict[str, Any]:
    result = gr.ImageSlider(
        label=t("Before / after"), type="filepath", format="png", interactive=False, elem_id="result"
    )
    gallery = gr.Gallery(
        label=t("Outputs: pick one to view, download or use as input"),
        columns=4,
        height="auto",
        visible=False,
        format="png",
        elem_id="gallery",
    )
    stats = gr.Textbox(label=t("Stats"), interactive=False, elem_id="stats")
    with gr.Row():
        download = gr.DownloadButton(t("Download PNG"), elem_id="download")
        use_as_input = gr.Button(t("Use as input"), elem_id="use-as-input")
    panel = {"metrics": None, "refresh_metrics": None}
    if metrics:
        with gr.Accordion(t("Metrics (all visitors, aggregate)"), open=False, elem_id="metrics-panel"):
            panel["metrics"] = gr.JSON(label=t("Requests, latency, GPU memory"), elem_id="metrics")
            panel["refresh_metrics"] = gr.Button(t("Refresh"), size="sm", elem_id="metrics-refresh")
    parts = {"result": result, "gallery": gallery, "stats": stats, "download": download, "use_as_input": use_as_input}
    history = gr.Gallery(
        label=t("History (this browser tab only): pick one to restore its image and settings"),
        columns=6,
        height=180,
        object_fit="cover",
        allow_preview=False,
        format="png",
        elem_id="history",
    )
    return {**parts, "outputs_state": gr.State([]), "history": history, "history_state": gr.State([]), **panel}


def build_layout(start: dict[str, Any], *, notice: str | None, fast_lora: bool, metrics: bool) -> Layout:
    """Place the components (inside an open `gr.Blocks`); `start` holds the controls' start values."""
    gr.Markdown(t(INTRO))
    if notice:
        gr.Markdown(f"**{notice}**", elem_id="notice")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            parts = {**_images(), **_prompt_and_presets(), **_advanced(start, fast_lora)}
        with gr.Column(scale=1, elem_id="results-column"):
            parts.update(_results(metrics))
    return Layout(**parts)
