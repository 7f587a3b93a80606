"""`EditRequest` and `EditResult`: the one input boundary and what comes back.

A request is validated once, when it is built; everything after it trusts its fields.

Example:
    >>> from PIL import Image
    >>> req = EditRequest(images=[Image.new("RGB", (640, 480))], prompt="white background", seed=7)
    >>> (req.width, req.height, req.steps)
    (1152, 864, 40)
"""

from __future__ import annotations

import numbers
import random
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from PIL import Image

from .errors import InvalidRequestError
from .geometry import DEFAULT_AREA, output_size
from .images import ImageInput, load_image

MAX_IMAGES = 3
MAX_PROMPT_CHARS = 2000
MIN_STEPS, MAX_STEPS = 2, 100  # one step with the model's terminal shift yields NaN
MAX_CFG = 20.0
MAX_SEED = 2**32 - 1
DEFAULT_NEGATIVE_PROMPT = " "
CONDITION_AREAS = ("model", "output")  # the model card's choice: enables true CFG with an "empty" prompt


@dataclass(frozen=True)
class EditRequest:
    """One edit: 1-3 images, an instruction and the sampling parameters, validated on creation.

    `height`/`width` default to the last image's aspect at ~`area` pixels (multiples of 32);
    `max_side` caps the longer side; `resize_to_input` returns the result at the last input
    image's own size. `condition_area` is where the input images are VAE-encoded: "model" (~1024²,
    as the pipeline does) or "output" (the output's area: fewer tokens, faster at small sizes).
    `options` holds per-request engine options (see the README).
    """

    images: Sequence[ImageInput]
    prompt: str
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    steps: int = 40
    true_cfg_scale: float = 4.0
    seed: int | None = None
    height: int | None = None
    width: int | None = None
    max_side: int | None = None
    area: int = DEFAULT_AREA
    resize_to_input: bool = False
    condition_area: str = "model"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: settle fields once, here
        set_(self, "images", _check_images(self.images))
        set_(self, "prompt", _check_prompt("prompt", self.prompt, required=True))
        set_(self, "negative_prompt", _check_prompt("negative_prompt", self.negative_prompt, required=False))
        set_(self, "steps", _check_int("steps", self.steps, MIN_STEPS, MAX_STEPS))
        set_(self, "true_cfg_scale", _check_cfg(self.true_cfg_scale))
        seed = random.randint(0, MAX_SEED) if self.seed is None else _check_int("seed", self.seed, 0, MAX_SEED)
        set_(self, "seed", seed)
        width, height = output_size(
            self.images[-1].size, height=self.height, width=self.width, max_side=self.max_side, area=self.area
        )
        set_(self, "width", width)
        set_(self, "height", height)
        if self.condition_area not in CONDITION_AREAS:
            raise InvalidRequestError("condition_area", self.condition_area, f"use one of {CONDITION_AREAS}")
        set_(self, "options", MappingProxyType(dict(self.options)))

    @property
    def uses_cfg(self) -> bool:
        """True CFG runs when the scale is above 1 and a negative prompt is given (as in diffusers)."""
        return self.true_cfg_scale > 1.0 and self.negative_prompt is not None

    @property
    def input_size(self) -> tuple[int, int]:
        """(width, height) of the last input image, the one the output is framed like."""
        return self.images[-1].size

    def parameters(self) -> dict[str, Any]:
        """The request's parameters as plain values (for metadata, logs and cache keys)."""
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "steps": self.steps,
            "true_cfg_scale": self.true_cfg_scale,
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
            "condition_area": self.condition_area,
            "options": dict(self.options),
        }


@dataclass(frozen=True)
class EditResult:
    """What an edit returns: the image and how it was made."""

    image: Image.Image
    seed: int
    timings: Mapping[str, float]
    peak_vram_gib: float | None
    model: str
    revision: str | None
    plan: str
    steps_run: int
    steps_skipped: int = 0
    notes: tuple[str, ...] = ()
    stage_peaks_gib: Mapping[str, float] = field(default_factory=dict)
    request_id: str = ""  # the id of the request's log line (qie.telemetry)

    def summary(self) -> str:
        """One line for people: per-stage times, peak VRAM, plan and seed."""
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items())
        vram = f"peak VRAM {self.peak_vram_gib:.1f} GiB" if self.peak_vram_gib is not None else "CPU"
        return f"{stages} | {vram} | plan {self.plan} | seed {self.seed} | steps {self.steps_run}"


def _check_images(images: Any) -> tuple[Image.Image, ...]:
    if isinstance(images, (Image.Image, str, bytes)) or not isinstance(images, Sequence):
        images = [images]
    if not 1 <= len(images) <= MAX_IMAGES:
        raise InvalidRequestError("images", f"{len(images)} images", f"give 1 to {MAX_IMAGES} images")
    return tuple(load_image(img, name=f"images[{i}]") for i, img in enumerate(images))


def _check_prompt(name: str, text: Any, *, required: bool) -> str | None:
    if text is None and not required:
        return None
    if not isinstance(text, str):
        raise InvalidRequestError(name, text, "give text")
    # Control characters (other than newlines and tabs) carry no meaning for the model.
    cleaned = "".join(c for c in text if c in "\n\t" or unicodedata.category(c)[0] != "C")
    if required and not cleaned.strip():
        raise InvalidRequestError(name, text, "describe the edit, e.g. 'replace the background with white'")
    if len(cleaned) > MAX_PROMPT_CHARS:
        raise InvalidRequestError(
            name, f"<{len(cleaned)} characters>", f"shorten it to at most {MAX_PROMPT_CHARS} characters"
        )
    return cleaned.strip() if required else cleaned


def _check_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        # numpy integers, and whole floats (web forms send numbers as floats)
        if isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer()):
            value = int(value)
        else:
            raise InvalidRequestError(name, value, f"give a whole number from {low} to {high}")
    if not low <= value <= high:
        raise InvalidRequestError(name, value, f"give a whole number from {low} to {high}")
    return value


def _check_cfg(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 1.0 <= value <= MAX_CFG:
        raise InvalidRequestError("true_cfg_scale", value, f"give a number from 1.0 (off) to {MAX_CFG}")
    return float(value)
