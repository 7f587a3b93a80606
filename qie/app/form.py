"""The edit form: the controls' values by name (the `/edit` API's parameters) and the request they make.

Example:
    >>> form = EditForm(image={"path": "...", "meta": {"_type": "gradio.FileData"}}, prompt="white background")
    >>> build_request(form)                                      # doctest: +SKIP
    EditRequest(images=(<PIL.Image.Image ...>,), prompt='white background', ...)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

import qie
from qie.app.presets import EDIT_DEFAULTS, FEATURES, feature_request_fields
from qie.app.uploads import received_path
from qie.core.geometry import DEFAULT_AREA, fit_area
from qie.core.request import MAX_SEED

Upload = dict[str, Any] | str | None  # Gradio's FileData dict (unprocessed event) or a path


@dataclass(frozen=True)
class EditForm:
    """The edit controls' values by name: the `/edit` API's parameters, in this order."""

    image: Upload
    image_2: Upload = None
    image_3: Upload = None
    prompt: str = ""
    negative_prompt: str = " "
    steps: float = EDIT_DEFAULTS["steps"]
    true_cfg_scale: float = EDIT_DEFAULTS["true_cfg_scale"]
    seed: float | None = 0
    randomize_seed: bool = True
    max_side: float = EDIT_DEFAULTS["max_side"]
    resize_to_input: bool = False
    condition_area: str = EDIT_DEFAULTS["condition_area"]
    mode: str = FEATURES["mode"].default
    tile_size: str = FEATURES["tile_size"].default
    attention_quant: str = FEATURES["attention_quant"].default
    early_exit: bool = FEATURES["early_exit"].default
    price_tag: str = ""
    # --- the page's own controls (not `/edit` parameters) ---
    count: float = 1  # outputs, with consecutive seeds, run as one batch
    aspect: str = "keep"
    mask: Any = None  # the region brush: Gradio's ImageEditor value
    rewrite: bool = False  # rewrite the instruction first (`Editor.rewrite_prompt`)
    rewritten: str = ""  # the last rewrite, as the person may have edited it
    rewritten_from: str = ""  # the instruction that rewrite was made from
    language: str = "en"  # the presets' language, also the rewrite's

    def prompt_to_rewrite(self) -> bool:
        """Whether Edit must rewrite first: asked for, and no rewrite of this very instruction to reuse."""
        return self.rewrite and not (self.rewritten.strip() and self.rewritten_from == self.prompt)


FORM_FIELDS = tuple(f.name for f in dataclasses.fields(EditForm))
PAGE_FIELDS = ("count", "aspect", "mask", "rewrite", "rewritten", "rewritten_from", "language")
API_FIELDS = tuple(name for name in FORM_FIELDS if name not in PAGE_FIELDS)
MAX_OUTPUTS = 4
# Output aspect presets (width, height); "keep" follows the last input image.
ASPECTS = {"keep": None, "1:1": (1, 1), "4:3": (4, 3), "3:4": (3, 4), "16:9": (16, 9), "9:16": (9, 16)}


def with_form_signature(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """`handler(request, progress, **values)` with the form's fields as its keyword parameters.

    Gradio reads an endpoint's parameter names and defaults from the signature; this keeps them
    those of `EditForm`, written once.
    """

    @functools.wraps(handler)
    async def endpoint(*args: Any, **values: Any) -> Any:
        return await handler(*args, **values)

    params = list(inspect.signature(handler).parameters.values())[:-1]  # drop **values
    params += [
        inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default,
        )
        for f in dataclasses.fields(EditForm)
    ]
    endpoint.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return endpoint


def _number(name: str, value: Any, kind: type[int] | type[float]) -> int | float:
    """A control's value as `kind` (sliders may send 40.0); EditRequest checks the range."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise qie.InvalidRequestError(name, value, "give a number") from None
    if kind is int and not number.is_integer():
        raise qie.InvalidRequestError(name, value, "give a whole number")
    return kind(number)


def build_request(form: EditForm, *, preprocessed: bool = False) -> qie.EditRequest:
    """The validated `EditRequest` of `form`; its images must be files Gradio received."""
    images = [
        received_path(value, name, preprocessed=preprocessed)
        for name, value in (("image", form.image), ("image_2", form.image_2), ("image_3", form.image_3))
        if value
    ]
    if not images:
        raise qie.InvalidRequestError("image", None, "upload an image first")
    features = {name: getattr(form, name) for name in ("mode", "tile_size", "attention_quant", "early_exit")}
    max_side = _number("max_side", form.max_side or 0, int) or None  # 0 = automatic size
    return qie.EditRequest(
        images=images,
        prompt=form.prompt,
        negative_prompt=form.negative_prompt,
        steps=_number("steps", form.steps, int),
        true_cfg_scale=_number("true_cfg_scale", form.true_cfg_scale, float),
        seed=None if form.randomize_seed or form.seed is None else _number("seed", form.seed, int),
        resize_to_input=bool(form.resize_to_input),
        condition_area=form.condition_area,
        mask=region_mask_of(form.mask, images[-1]),
        **_size(form.aspect, max_side),
        **feature_request_fields(features),
    )


def build_requests(form: EditForm, *, preprocessed: bool = False) -> list[qie.EditRequest]:
    """`count` requests of `form` with consecutive seeds (one batch; the first seed as the form says)."""
    count = _number("count", form.count, int)
    if not 1 <= count <= MAX_OUTPUTS:
        raise qie.InvalidRequestError("count", count, f"choose 1 to {MAX_OUTPUTS} outputs")
    first = build_request(form, preprocessed=preprocessed)
    return [first] + [dataclasses.replace(first, seed=(first.seed + i) % (MAX_SEED + 1)) for i in range(1, count)]


def _size(aspect: str, max_side: int | None) -> dict[str, int | None]:
    """The request's size fields for an aspect preset: width and height, or the input's aspect."""
    if aspect not in ASPECTS:
        raise qie.InvalidRequestError("aspect", aspect, f"use one of {', '.join(ASPECTS)}")
    if ASPECTS[aspect] is None:
        return {"max_side": max_side}
    width, height = fit_area(*ASPECTS[aspect], area=DEFAULT_AREA, max_side=max_side)
    return {"width": width, "height": height}


def region_mask_of(editor_value: Any, source: str) -> Image.Image | None:
    """The brushed region as a mask the size of `source` (white = edit), or None when nothing is brushed.

    `editor_value` is the region brush's value (Gradio's ImageEditor: background, layers, composite);
    each of its files must be one Gradio received for this request.
    """
    if not isinstance(editor_value, dict) or not editor_value.get("layers"):
        return None
    region = None
    for i, layer in enumerate(editor_value["layers"]):
        with Image.open(received_path(layer, f"mask layer {i + 1}")) as img:
            alpha = np.asarray(img.convert("RGBA"))[..., 3] > 0
        region = alpha if region is None or region.shape != alpha.shape else region | alpha
    if region is None or not region.any():
        return None
    with Image.open(source) as img:
        size = img.size
    return Image.fromarray(region.astype(np.uint8) * 255, mode="L").resize(size, Image.Resampling.NEAREST)
