"""What the web app offers around an edit: e-commerce prompt presets (EN/ZH), feature toggles, examples.

Pure data and small helpers; no Gradio and no torch here, so they are testable and reusable.

Example:
    >>> preset_prompt("price_tag", "en", tag="Sale $19.9")
    "Add a red price tag that says 'Sale $19.9' in the bottom right corner, keep the product unchanged"
    >>> sorted(capabilities())
    ['attention_quant', 'early_exit', 'mode', 'tile_size']
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qie.errors import InvalidRequestError

LANGUAGES = {"en": "English", "zh": "中文"}
DEFAULT_PRICE_TAG = "Sale $19.9"
MAX_TAG_CHARS = 40
REPEATED_EDIT_WARNING = (
    "Quality decays a little with every edit of an edited image; for many changes, "
    "prefer one combined instruction on the original photo."
)


# The settings the app starts with (the model card's), and smaller ones for the tiny model's CPU demo.
EDIT_DEFAULTS: dict[str, Any] = {"steps": 40, "true_cfg_scale": 4.0, "max_side": 0, "condition_area": "auto"}
CPU_DEMO_DEFAULTS: dict[str, Any] = {**EDIT_DEFAULTS, "steps": 4, "max_side": 384, "condition_area": "output"}
FAST_MODE_SETTINGS: dict[str, Any] = {"steps": 8, "true_cfg_scale": 1.0}  # the 8-step Lightning LoRA: no CFG


@dataclass(frozen=True)
class Preset:
    """One e-commerce instruction in English and Chinese; `{tag}` stands for the price-tag text."""

    key: str
    label: str
    en: str
    zh: str

    @property
    def uses_tag(self) -> bool:
        return "{tag}" in self.en


PRESETS: dict[str, Preset] = {
    p.key: p
    for p in (
        Preset(
            "white_background",
            "White background",
            "Replace the background with pure white, keep the product unchanged",
            "把背景换成纯白色，产品保持不变",
        ),
        Preset(
            "remove_watermark",
            "Remove watermark / logo",
            "Remove the watermark and any logo, keep everything else unchanged",
            "去除水印和任何标志，其余保持不变",
        ),
        Preset(
            "price_tag",
            "Add price tag",
            "Add a red price tag that says '{tag}' in the bottom right corner, keep the product unchanged",
            "在右下角添加一个写着“{tag}”的红色价格标签，产品保持不变",
        ),
        Preset(
            "combined",
            "All three",
            "Remove the logo, make the background pure white, and add a red price tag that says '{tag}' "
            "in the bottom right corner",
            "去除标志，把背景换成纯白色，并在右下角添加一个写着“{tag}”的红色价格标签",
        ),
    )
}


def preset_prompt(key: str, language: str = "en", tag: str = DEFAULT_PRICE_TAG) -> str:
    """The instruction of preset `key` in `language` ("en" or "zh"), with the price tag filled in.

    Example:
        >>> preset_prompt("white_background", "zh")
        '把背景换成纯白色，产品保持不变'
    """
    if key not in PRESETS:
        raise InvalidRequestError("preset", key, f"use one of {sorted(PRESETS)}")
    if language not in LANGUAGES:
        raise InvalidRequestError("language", language, f"use one of {sorted(LANGUAGES)}")
    preset = PRESETS[key]
    template = preset.zh if language == "zh" else preset.en
    if not preset.uses_tag:
        return template
    tag = (tag or "").strip()
    if not tag or len(tag) > MAX_TAG_CHARS:
        raise InvalidRequestError(
            "price_tag", tag, f"give the tag text, 1 to {MAX_TAG_CHARS} characters, e.g. {DEFAULT_PRICE_TAG!r}"
        )
    return template.format(tag=tag)


@dataclass(frozen=True)
class Feature:
    """An engine option the app shows as a control; it is live once `EditRequest` has `field`.

    `choices` are (label, value) pairs for a dropdown, or None for a checkbox. `to_request` turns
    the control's value into the `EditRequest` field's value.
    """

    name: str
    field: str
    label: str
    info: str
    default: Any
    choices: tuple[tuple[str, Any], ...] | None = None
    to_request: Callable[[Any], Any] = lambda value: value


EARLY_EXIT_THRESHOLD = 0.02  # relative change of the predicted clean image (qie/speed/early_exit.py)


def _tile_px(value: Any) -> int | None:
    return None if value in (None, "off", 0) else int(value)


# The one table of toggles whose engines may be missing from a build. To switch one on, add its
# field to `EditRequest`; to rename, change `field` here.
FEATURES: dict[str, Feature] = {
    f.name: f
    for f in (
        Feature(
            "mode",
            field="mode",
            label="Mode",
            info="fast: few-step Lightning LoRA (8 steps, no CFG); quality: the full model",
            default="quality",
            choices=(("quality", "quality"), ("fast (few-step)", "fast")),
        ),
        Feature(
            "tile_size",
            field="tile_size",
            label="VAE tile size",
            info="encode/decode the image in blended tiles: less GPU memory at large sizes",
            default="off",
            choices=(("off", "off"), ("256 px", "256"), ("512 px", "512"), ("768 px", "768")),
            to_request=_tile_px,
        ),
        Feature(
            "attention_quant",
            field="attention_quant",
            label="Attention / KV quantization",
            info=(
                "fp8: ~8% faster steps on Hopper GPUs with FlashAttention-3, pixels move more; "
                "int8: for GPUs without fast bf16 attention"
            ),
            default="off",
            choices=(("off", "off"), ("int8", "int8"), ("fp8", "fp8")),
        ),
        Feature(
            "early_exit",
            field="early_exit_threshold",
            label="Early exit",
            info="stop denoising once the predicted image changes by less than 2% for 2 steps",
            default=False,
            to_request=lambda on: EARLY_EXIT_THRESHOLD if on else None,
        ),
    )
}


def feature_available(feature: Feature) -> bool:
    """Whether this build's `EditRequest` carries `feature.field`.

    Example:
        >>> feature_available(Feature("x", field="steps", label="Steps", info="", default=40))
        True
    """
    from qie.core.request import EditRequest

    return feature.field in {f.name for f in dataclasses.fields(EditRequest)}


def capabilities() -> dict[str, bool]:
    """Each feature's name and whether this build can run it."""
    return {name: feature_available(feature) for name, feature in FEATURES.items()}


def unavailable_note(feature: Feature) -> str:
    """The text shown on a disabled control."""
    return f"Not available in this build ({feature.info})."


def feature_request_fields(values: dict[str, Any]) -> dict[str, Any]:
    """`EditRequest` keyword arguments for `values` (feature name -> control value).

    Features this build lacks are left out while at their default; any other value is refused
    rather than silently ignored.
    """
    out = {}
    for name, value in values.items():
        feature = FEATURES[name]
        allowed = [choice for _, choice in feature.choices] if feature.choices else None
        if allowed is not None and value not in allowed:
            raise InvalidRequestError(name, value, f"use one of {', '.join(map(str, allowed))}")
        if feature_available(feature):
            out[feature.field] = feature.to_request(value)
        elif value != feature.default:
            raise InvalidRequestError(name, value, f"not available in this build; leave it at {feature.default!r}")
    return out


@dataclass(frozen=True)
class Example:
    """A shipped example photo and an instruction for it."""

    image: Path
    prompt: str
    prompt_zh: str


def load_examples(folder: str | Path) -> list[Example]:
    """The examples listed in `folder/prompts.json` whose image files exist."""
    folder = Path(folder)
    index = folder / "prompts.json"
    if not index.is_file():
        return []
    entries = json.loads(index.read_text(encoding="utf-8"))
    return [
        Example(folder / e["image"], e["prompt"], e.get("prompt_zh", e["prompt"]))
        for e in entries
        if (folder / e["image"]).is_file()
    ]
