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
from dataclasses import InitVar, dataclass, field
from types import MappingProxyType
from typing import Any

from PIL import Image

from qie.core.geometry import DEFAULT_AREA, output_size
from qie.core.images import ImageInput, image_digest, load_image
from qie.core.masking import DEFAULT_FEATHER, MAX_FEATHER, check_region
from qie.errors import InvalidRequestError
from qie.memory.tiles import DEFAULT_OVERLAP as DEFAULT_TILE_OVERLAP
from qie.memory.tiles import Tiling
from qie.speed.options import ATTENTION_QUANT_MODES, STEP_CACHE_MODES

MAX_IMAGES = 3
MAX_PROMPT_CHARS = 2000
MIN_STEPS, MAX_STEPS = 2, 100  # one step with the model's terminal shift yields NaN
MAX_CFG = 20.0
MAX_SEED = 2**32 - 1
DEFAULT_NEGATIVE_PROMPT = " "
CONDITION_AREAS = ("model", "output")
# Automatic condition area: outputs under this many pixels (~0.6 MP) encode their inputs at the
# output's area. At 768² that cut the 8-step CFG edit from 4.99 s to 3.60 s on an H200 (bf16 eager).
AUTO_OUTPUT_AREA_MAX = 600_000
# Speed options (README "Speed options"), applied by qie.core.speed_setup.
MODES = ("quality", "fast")
# Field metadata: the field may differ between the requests of one denoising batch (qie.core.grouping).
# Every other field must be equal within a batch, so a new option never mixes in a batch by mistake.
PER_SAMPLE = MappingProxyType({"per_sample": True})
TYPED_OPTIONS = (
    "mode='fast'",
    "attention_quant='int8'",
    "step_cache='fbcache'",
    "step_cache_threshold=0.1",
    "step_cache_interval=3",
    "early_exit_threshold=0.02",
    "early_exit_patience=2",
    "tile_size=512",
)


@dataclass(frozen=True)
class EditRequest:
    """One edit: 1-3 images, an instruction and the sampling parameters, validated on creation.

    `height`/`width` default to the last image's aspect at ~`area` pixels (multiples of 32);
    `max_side` caps the longer side; `resize_to_input` returns the result at the last input
    image's own size. `condition_area` is where the input images are VAE-encoded: "model" (~1024²,
    as the pipeline does), "output" (the output's area: fewer tokens, faster at small sizes) or None
    ("auto" is the same): "output" for outputs under `AUTO_OUTPUT_AREA_MAX` pixels, else "model"
    (`condition_area_used` says which).
    `mode`, `attention_quant`, `step_cache*` and `early_exit*` are the speed options (README
    "Speed options"); there is no free-form `options` mapping: passing a non-empty `options`
    raises `InvalidRequestError` naming the typed fields to use instead.

    Fields marked `PER_SAMPLE` may differ between requests denoised in one batch
    (`Editor.edit_batch`); the others must match (`qie.core.grouping.batch_key`).
    """

    images: Sequence[ImageInput] = field(metadata=PER_SAMPLE)
    prompt: str = field(metadata=PER_SAMPLE)
    negative_prompt: str = field(default=DEFAULT_NEGATIVE_PROMPT, metadata=PER_SAMPLE)
    steps: int = 40
    true_cfg_scale: float = field(default=4.0, metadata=PER_SAMPLE)  # the batch key holds the effective CFG
    seed: int | None = field(default=None, metadata=PER_SAMPLE)
    height: int | None = None
    width: int | None = None
    max_side: int | None = field(default=None, metadata=PER_SAMPLE)  # settled into width and height
    area: int = field(default=DEFAULT_AREA, metadata=PER_SAMPLE)  # settled into width and height
    resize_to_input: bool = field(default=False, metadata=PER_SAMPLE)
    condition_area: str | None = None
    options: InitVar[Mapping[str, Any] | None] = None  # refused when not empty: see TYPED_OPTIONS
    # --- tiled VAE (qie/memory/tiling.py) and masked edit (qie/core/masking.py): applied per image ---
    tile_size: int | None = field(default=None, metadata=PER_SAMPLE)
    tile_overlap: int = field(default=DEFAULT_TILE_OVERLAP, metadata=PER_SAMPLE)
    mask: ImageInput | None = field(default=None, metadata=PER_SAMPLE)
    box: tuple[int, int, int, int] | None = field(default=None, metadata=PER_SAMPLE)
    mask_feather: int = field(default=DEFAULT_FEATHER, metadata=PER_SAMPLE)
    # --- speed options (qie.core.speed_setup) ---
    mode: str | None = None  # "fast" (Lightning LoRA), "quality", None: the editor's default
    attention_quant: str = "off"
    step_cache: str = "off"
    step_cache_threshold: float = 0.05  # fbcache: relative change of the first block's residual
    step_cache_interval: int = 3  # taylorseer: a full pass every this many calls
    early_exit_threshold: float | None = None  # relative change of the predicted clean image
    early_exit_patience: int = 2
    batch_cfg: bool | None = None  # both CFG branches in one call (qie.core.stages.BatchedCfg); None: where it pays

    def __post_init__(self, options: Mapping[str, Any] | None = None) -> None:
        if options is not None and options != {}:
            fix = f"per-request options are typed fields; set them instead, e.g. {', '.join(TYPED_OPTIONS)}"
            raise InvalidRequestError("options", options, fix)
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
        if self.condition_area == "auto":
            set_(self, "condition_area", None)
        if self.condition_area is not None and self.condition_area not in CONDITION_AREAS:
            raise InvalidRequestError(
                "condition_area", self.condition_area, f"use one of {CONDITION_AREAS}, or 'auto' (None)"
            )
        if not isinstance(self.resize_to_input, bool):
            raise InvalidRequestError("resize_to_input", self.resize_to_input, "give true or false")
        # --- tiled VAE and masked edit ---
        if self.tile_size is not None:
            _ = self.tiling  # validates tile_size and tile_overlap
        mask, box = check_region(self.mask, self.box, self.input_size)
        set_(self, "mask", mask)
        set_(self, "box", box)
        set_(self, "mask_feather", _check_int("mask_feather", self.mask_feather, 0, MAX_FEATHER))
        self._check_speed_options()

    def _check_speed_options(self) -> None:
        for name, allowed in (
            ("mode", (None, *MODES)),
            ("attention_quant", ATTENTION_QUANT_MODES),
            ("step_cache", STEP_CACHE_MODES),
        ):
            if getattr(self, name) not in allowed:
                raise InvalidRequestError(name, getattr(self, name), f"use one of {allowed}")
        set_ = object.__setattr__
        set_(self, "step_cache_threshold", _check_fraction("step_cache_threshold", self.step_cache_threshold))
        set_(self, "step_cache_interval", _check_int("step_cache_interval", self.step_cache_interval, 1, MAX_STEPS))
        if self.early_exit_threshold is not None:
            set_(self, "early_exit_threshold", _check_fraction("early_exit_threshold", self.early_exit_threshold))
        set_(self, "early_exit_patience", _check_int("early_exit_patience", self.early_exit_patience, 1, MAX_STEPS))
        if self.batch_cfg is not None and not isinstance(self.batch_cfg, bool):
            raise InvalidRequestError(
                "batch_cfg", self.batch_cfg, "use True (one batched call), False (two calls) or None (where it pays)"
            )

    @property
    def uses_cfg(self) -> bool:
        """True CFG runs when the scale is above 1 and a negative prompt is given (as in diffusers)."""
        return self.true_cfg_scale > 1.0 and self.negative_prompt is not None

    @property
    def condition_area_used(self) -> str:
        """ "model" or "output": `condition_area`, or when it is None the automatic choice for this output size.

        Example:
            >>> EditRequest(images=[Image.new("RGB", (64, 64))], prompt="x", max_side=768).condition_area_used
            'output'
        """
        if self.condition_area is not None:
            return self.condition_area
        return "output" if self.width * self.height < AUTO_OUTPUT_AREA_MAX else "model"

    @property
    def input_size(self) -> tuple[int, int]:
        """(width, height) of the last input image, the one the output is framed like."""
        return self.images[-1].size

    @property
    def tiling(self) -> Tiling | None:
        """The VAE tiling (`qie.memory.tiles.Tiling`) asked for, or None when `tile_size` is None."""
        if self.tile_size is None:
            return None
        return Tiling(self.tile_size, self.tile_overlap)

    @property
    def has_region(self) -> bool:
        """True when a `mask` or `box` limits the edit to a region."""
        return self.mask is not None or self.box is not None

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
            "condition_area": self.condition_area_used,
            "tile_size": self.tile_size,
            "tile_overlap": self.tile_overlap,
            "box": self.box,
            "mask": image_digest(self.mask)[:16] if self.mask is not None else None,
            "mask_feather": self.mask_feather,
            "mode": self.mode,
            "attention_quant": self.attention_quant,
            "step_cache": self.step_cache,
            "step_cache_threshold": self.step_cache_threshold,
            "step_cache_interval": self.step_cache_interval,
            "early_exit_threshold": self.early_exit_threshold,
            "early_exit_patience": self.early_exit_patience,
            "batch_cfg": self.batch_cfg,
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
    cached_calls: int = 0  # transformer calls served by the step cache instead of computed
    request_id: str = ""  # the id of the request's log line (qie.telemetry)

    def summary(self) -> str:
        """One line for people: per-stage times, peak VRAM, plan and seed."""
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items())
        vram = f"peak VRAM {self.peak_vram_gib:.1f} GiB" if self.peak_vram_gib is not None else "CPU"
        skipped = f" ({self.steps_skipped} skipped)" if self.steps_skipped else ""
        notes = "".join(f" | {note}" for note in self.notes)
        return f"{stages} | {vram} | plan {self.plan} | seed {self.seed} | steps {self.steps_run}{skipped}{notes}"


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


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise InvalidRequestError(name, value, "give a number from 0 to 1")
    return float(value)


def _check_cfg(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 1.0 <= value <= MAX_CFG:
        raise InvalidRequestError("true_cfg_scale", value, f"give a number from 1.0 (off) to {MAX_CFG}")
    return float(value)
