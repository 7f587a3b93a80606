"""The models qie knows: one table of specs, and how a `--model` value resolves to one.

Edit-2509 and Edit-2511 load with the same `QwenImageEditPlusPipeline` and components; the one
code difference is the transformer config flag `zero_cond_t` (2511: the condition-image tokens are
modulated at timestep 0). A spec's `variant` names that flavour; the tiny offline models exist in
both.

`resolve_model` accepts a registry name (`2509`, `2511`, `tiny`, `tiny-2511`), a registered hub id
(`Qwen/Qwen-Image-Edit-2511`), a local pipeline folder (its variant read from
`transformer/config.json`) or any other hub id (loaded as a `QwenImageEditPlusPipeline`, with a
warning that it is not in the registry).

Example:
    >>> resolve_model("2511").source
    'Qwen/Qwen-Image-Edit-2511'
    >>> resolve_model("tiny-2511").spec.variant
    '2511'
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qie.errors import InvalidRequestError
from qie.speed.options import LightningSpec

log = logging.getLogger(__name__)

VARIANTS = ("2509", "2511")
TINY = "tiny"


@dataclass(frozen=True)
class ModelSpec:
    """A model qie can load: where it comes from, its transformer flavour and its defaults.

    `source` is a hub id, or "tiny" for the random pipeline built offline. `revision` is the hub
    revision loaded when none is given (None: the hub's main branch). `steps`, `true_cfg_scale`
    and `negative_prompt` are the model card's sampling defaults; `lightning` names the published
    few-step LoRA files (fast mode), whose scheduler is `qie.speed.fast_mode.LIGHTNING_SCHEDULER_CONFIG`.
    """

    name: str
    source: str
    variant: str
    description: str
    params_billion: float  # transformer + text encoder + VAE
    needs_gpu: bool
    revision: str | None = None
    lightning: LightningSpec | None = None
    steps: int = 40
    true_cfg_scale: float = 4.0
    negative_prompt: str = " "

    @property
    def zero_cond_t(self) -> bool:
        """The transformer config flag of this variant (True for Edit-2511)."""
        return self.variant == "2511"

    @property
    def is_tiny(self) -> bool:
        return self.source == TINY

    def weights_gib(self, bytes_per_param: float = 2.0) -> float:
        """Size of all weights at `bytes_per_param` (2 for bf16)."""
        return self.params_billion * 1e9 * bytes_per_param / 2**30


LIGHTNING_2509 = LightningSpec(
    repo="lightx2v/Qwen-Image-Lightning",
    folder="Qwen-Image-Edit-2509",
    files={
        steps: {p: f"Qwen-Image-Edit-2509-Lightning-{steps}steps-V1.0-{p}.safetensors" for p in ("bf16", "fp32")}
        for steps in (4, 8)
    },
)
LIGHTNING_2511 = LightningSpec(
    repo="lightx2v/Qwen-Image-Edit-2511-Lightning",
    folder="",
    files={
        4: {p: f"Qwen-Image-Edit-2511-Lightning-4steps-V1.0-{p}.safetensors" for p in ("bf16", "fp32")},
        8: {"bf16": "Qwen-Image-Edit-2511-Lightning-8steps-V1.0-bf16.safetensors"},
    },
)
_FULL_SIZE_BILLION = 20.4 + 8.3 + 0.13
_TINY_BILLION = 0.0002

MODELS: dict[str, ModelSpec] = {
    "2509": ModelSpec(
        name="2509",
        source="Qwen/Qwen-Image-Edit-2509",
        variant="2509",
        description="Qwen-Image-Edit-2509: 20B MMDiT + Qwen2.5-VL-7B text encoder + VAE (the default)",
        params_billion=_FULL_SIZE_BILLION,
        needs_gpu=True,
        lightning=LIGHTNING_2509,
    ),
    "2511": ModelSpec(
        name="2511",
        source="Qwen/Qwen-Image-Edit-2511",
        variant="2511",
        description="Qwen-Image-Edit-2511: as 2509, condition tokens modulated at t=0 (zero_cond_t); less drift",
        params_billion=_FULL_SIZE_BILLION,
        needs_gpu=True,
        lightning=LIGHTNING_2511,
    ),
    "tiny": ModelSpec(
        name="tiny",
        source=TINY,
        variant="2509",
        description="tiny random 2509-style pipeline built offline (tests and demos; its edits are noise)",
        params_billion=_TINY_BILLION,
        needs_gpu=False,
        lightning=LIGHTNING_2509,
    ),
    "tiny-2511": ModelSpec(
        name="tiny-2511",
        source=TINY,
        variant="2511",
        description="tiny random 2511-style pipeline (zero_cond_t) built offline",
        params_billion=_TINY_BILLION,
        needs_gpu=False,
        lightning=LIGHTNING_2511,
    ),
}
DEFAULT_MODEL = "2509"
REAL_MODEL_ID = MODELS[DEFAULT_MODEL].source


@dataclass(frozen=True)
class ResolvedModel:
    """What a `--model` value means.

    `name` is what editors record (the hub id for registered models, "tiny"/"tiny-2511", the folder
    or the hub id given); `source` is what `from_pretrained` gets ("tiny" for the offline models);
    `spec` carries the defaults and Lightning files (for a folder or unknown hub id: those of its
    variant, when known); `registered` is False for folders and unknown hub ids.
    """

    name: str
    source: str
    spec: ModelSpec | None
    registered: bool

    @property
    def variant(self) -> str | None:
        return self.spec.variant if self.spec is not None else None


def resolve_model(model: str, *, quiet: bool = False) -> ResolvedModel:
    """Resolve a registry name, hub id or local folder (see the module docstring).

    Raises `InvalidRequestError` for a value that is none of them. `quiet`: no warning for a hub id
    outside the registry (a check before loading, which warns).
    """
    value = str(model).strip()
    spec = MODELS.get(value) or next((s for s in MODELS.values() if s.source == value and not s.is_tiny), None)
    if spec is not None:
        name = spec.name if spec.is_tiny else spec.source
        return ResolvedModel(name=name, source=spec.source, spec=spec, registered=True)
    folder = Path(value).expanduser()
    if folder.is_dir():
        variant = folder_variant(folder)
        return ResolvedModel(name=value, source=str(folder), spec=variant_spec(variant), registered=False)
    if "/" in value and not value.startswith(("/", ".", "~")) and value.count("/") == 1:
        (log.debug if quiet else log.warning)(
            "model=%r is not in qie's registry (%s): loading it as a QwenImageEditPlusPipeline; "
            "its variant, defaults and Lightning files follow its transformer config",
            value,
            ", ".join(MODELS),
        )
        return ResolvedModel(name=value, source=value, spec=None, registered=False)
    raise InvalidRequestError(
        "model",
        model,
        f"use one of {', '.join(MODELS)}, a hub id such as {MODELS['2511'].source}, or a folder holding a "
        "diffusers pipeline",
    )


def is_tiny(model: str) -> bool:
    """True for the registry's tiny offline models ("tiny", "tiny-2511")."""
    return model in MODELS and MODELS[model].is_tiny


def check_variant(variant: str) -> str:
    """`variant` if it is one of `VARIANTS`, else `InvalidRequestError`."""
    if variant not in VARIANTS:
        raise InvalidRequestError("variant", variant, f"use one of {', '.join(VARIANTS)}")
    return variant


def folder_variant(folder: Path) -> str | None:
    """The variant of a saved pipeline, from `transformer/config.json` (None when unreadable)."""
    config = folder / "transformer" / "config.json"
    try:
        values: dict[str, Any] = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    return "2511" if values.get("zero_cond_t") else "2509"


def variant_spec(variant: str | None) -> ModelSpec | None:
    """The registry's full-size spec for `variant` ("2509"/"2511"), None for None."""
    return None if variant is None else next(s for s in MODELS.values() if s.variant == variant and not s.is_tiny)


def pipeline_variant(pipe: Any) -> str:
    """The variant of a loaded pipeline, from its transformer config."""
    return "2511" if getattr(pipe.transformer.config, "zero_cond_t", False) else "2509"


def spec_for_pipeline(spec: ModelSpec | None, pipe: Any) -> ModelSpec:
    """`spec` when it matches the loaded transformer, else the registry spec of its real variant."""
    variant = pipeline_variant(pipe)
    if spec is not None and spec.variant == variant:
        return spec
    if spec is not None:
        log.warning(
            "model %s is registered as variant %s, its transformer config says %s (zero_cond_t): following the config",
            spec.name,
            spec.variant,
            variant,
        )
    return variant_spec(variant)


def registry_lines() -> list[str]:
    """One line per registered model, for `python -m qie info`."""
    lines = []
    for spec in MODELS.values():
        fast = "-"
        if spec.lightning is not None:
            fast = f"{spec.lightning.repo} ({'/'.join(str(s) for s in spec.lightning.steps)} steps)"
        source = "built offline" if spec.is_tiny else spec.source
        lines.append(
            f"{spec.name:10} {source:28} variant {spec.variant}, zero_cond_t={spec.zero_cond_t}, "
            f"{spec.steps} steps, CFG {spec.true_cfg_scale:g}; Lightning: {fast}"
        )
    return lines
