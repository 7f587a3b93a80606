"""The one place that reads qie's `QIE_*` environment variables.

Adapters (CLI, web app, Ray Serve) call `Settings.from_env()` once and pass on what each part needs:
`LoadOptions.from_env(settings)` for the engine, `settings.safety` and `settings.fault` to the
`Editor`. A few library defaults that the environment is documented to override (input limits,
cache folder, prompt logging, price-tag font) are looked up here at call time with `read(field)`,
so they follow the environment without a restart. Every variable is listed in `VARIABLES`.

Variables that belong to other programs stay where they are used, because those programs define
them: `HF_HUB_OFFLINE`/`HF_HOME` (huggingface_hub; quoted in `qie.core.models`' error messages),
`PYTORCH_CUDA_ALLOC_CONF` and `TORCHINDUCTOR_*` (defaults set for PyTorch), `WORLD_SIZE`/`RANK`/
`LOCAL_RANK` (torchrun), `RAY_ADDRESS` (Ray), `SPACE_ID`/`SPACES_ZERO_GPU`/`GRADIO_SERVER_*`/
`GRADIO_EXAMPLES_CACHE` (Hugging Face Spaces and Gradio), and the secret-looking names whose values
the log filter masks. `tests/core/test_settings.py` fails if another module reads a `QIE_*` variable.

Example:
    >>> s = Settings.from_env({"QIE_MODEL": "tiny", "QIE_MAX_INPUT_PIXELS": "1000000"})
    >>> (s.model, s.max_input_pixels, s.safety)
    ('tiny', 1000000, None)
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from qie.errors import InvalidRequestError

log = logging.getLogger(__name__)

Environ = Mapping[str, str]
PREFIX = "QIE_"
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class SafetySettings:
    """How the optional safety filter runs (`qie.core.safety.load_filter` builds it).

    `model` None means the default classifier, `threshold` None the filter's default.
    """

    model: str | None = None
    threshold: float | None = None
    inputs: bool = True
    outputs: bool = True
    required: bool = False


@dataclass(frozen=True)
class Variable:
    """One `QIE_*` variable: the `Settings` field it fills, how it is parsed, what it means."""

    name: str
    field: str
    parse: Callable[[str, str], Any]  # (variable name, text) -> value; raises InvalidRequestError
    help: str
    default: Any = None  # the value when the variable is unset


def _text(name: str, text: str) -> str | None:
    return text.strip() or None


def _bool(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value not in TRUE + FALSE:
        raise InvalidRequestError(name, text, f"use 1 or 0 (true/false), e.g. {name}=1")
    return value in TRUE


def _number(kind: type, minimum: float, example: str) -> Callable[[str, str], Any]:
    def parse(name: str, text: str) -> Any:
        if not text.strip():
            return None
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < minimum:
            what = "a whole number" if kind is int else "a number"
            raise InvalidRequestError(name, text, f"give {what} of at least {minimum}, e.g. {name}={example}")
        return value

    return parse


def _path(name: str, text: str) -> Path | None:
    return Path(text).expanduser() if text.strip() else None


def check_fault(name: str, text: str) -> str | None:
    """`component:error[:after[:times]]`; the component is checked against the pipeline when armed."""
    spec = text.strip()
    if not spec:
        return None
    parts = spec.split(":")
    numbers_ok = all(p.isdigit() for p in parts[2:])
    if len(parts) > 4 or not parts[0] or not numbers_ok or (len(parts) > 1 and parts[1] not in ("oom", "runtime")):
        raise InvalidRequestError(
            name, text, f"use component:error[:after[:times]] with error oom or runtime, e.g. {name}=transformer:oom:2"
        )
    return spec


def _list(name: str, text: str) -> tuple[str, ...] | None:
    return tuple(item.strip() for item in text.split(",") if item.strip()) or None


def _checks(name: str, text: str) -> frozenset[str]:
    checks = frozenset(c.strip() for c in text.split(",") if c.strip())
    if not checks or checks - {"inputs", "outputs"}:
        raise InvalidRequestError(name, text, f"use inputs, outputs or both, e.g. {name}=inputs,outputs")
    return checks


VARIABLES: tuple[Variable, ...] = (
    # the engine (LoadOptions.from_env)
    Variable("QIE_MODEL", "model", _text, "2509, 2511, tiny, tiny-2511, a hub id or a local folder (default 2509)"),
    Variable("QIE_REVISION", "revision", _text, "hub revision: branch, tag or commit"),
    Variable("QIE_DEVICE", "device", _text, "cuda, cuda:1 or cpu (default: CUDA when present)"),
    Variable("QIE_DTYPE", "dtype", _text, "bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)"),
    Variable("QIE_PLAN", "plan", _text, "memory plan (default auto)"),
    Variable("QIE_VRAM_BUDGET", "vram_budget_gib", _number(float, 0.5, "16"), "GiB the plan may use"),
    Variable("QIE_COMPILE", "compile", _bool, "1: regional torch.compile + warm-up (CUDA)", False),
    Variable("QIE_COMPILE_MODE", "compile_mode", _text, "torch.compile mode of QIE_COMPILE (default default)"),
    Variable("QIE_TEXT_ENCODER_FP8", "text_encoder_fp8", _bool, "1: text encoder weights stored in fp8", False),
    Variable(
        "QIE_VAE_COMPILE",
        "vae_compile",
        _text,
        "VAE decoder and encoder compile: auto (with QIE_COMPILE, resident plans), off, on, channels-last",
    ),
    Variable("QIE_ATTENTION", "attention", _text, "attention backend at load (default auto)"),
    Variable("QIE_FAST_LORA", "fast_lora", _text, "Lightning LoRA for fast mode: file, folder or hub id"),
    Variable("QIE_FAST_STEPS", "fast_steps", _number(int, 1, "8"), "which Lightning LoRA: 4 or 8 steps"),
    Variable("QIE_LORAS", "loras", _list, "LoRAs fused at load: PATH_OR_REPO[:SCALE], comma-separated", ()),
    # safety filter and fault drills (handed to the Editor)
    Variable("QIE_SAFETY", "safety", _text, "1 or a classifier id/folder: turn the safety filter on"),
    Variable("QIE_SAFETY_THRESHOLD", "safety_threshold", _number(float, 0.0, "0.8"), "block at or above this"),
    Variable("QIE_SAFETY_CHECK", "safety_check", _checks, "what to check: inputs,outputs (default both)"),
    Variable("QIE_SAFETY_REQUIRED", "safety_required", _bool, "1: refuse to start or edit without the filter", False),
    Variable("QIE_FAULT", "fault", check_fault, "component:error[:after[:times]]: arm a fault drill at load"),
    # files and limits
    Variable("QIE_CACHE", "cache_dir", _path, "qie's cache folder (default ~/.cache/qie)"),
    Variable("QIE_RESULT_CACHE", "result_cache_dir", _path, "the disk result cache's folder"),
    Variable("QIE_MAX_INPUT_PIXELS", "max_input_pixels", _number(int, 1, "40000000"), "pixels of one input"),
    Variable("QIE_MAX_INPUT_BYTES", "max_input_bytes", _number(int, 1, "52428800"), "bytes of one input file"),
    Variable("QIE_LOG_PROMPTS", "log_prompts", _bool, "1: log full prompts (they may be private)", False),
    # the web app
    Variable("QIE_EDIT_TIMEOUT_S", "edit_timeout_s", _number(float, 1.0, "900"), "app: stop an edit after", 900.0),
    Variable("QIE_GPU_DURATION", "gpu_duration_s", _number(int, 1, "120"), "app on ZeroGPU: s per call", 120),
    Variable("QIE_PRELOAD", "preload", _bool, "app: load the model and warm up before serving", False),
    Variable("QIE_TAG_FONT", "tag_font", _text, "app: font file for the price tag (CJK-capable)"),
)

# `ServeSettings` fields read as QIE_<FIELD> (the result cache as QIE_RESULT_CACHE_URL: QIE_CACHE is a folder).
SERVE_VARIABLES: dict[str, str] = {
    "QIE_RESULT_CACHE_URL": "cache",
    "QIE_CACHE_SECRET": "cache_secret",  # key of the Redis result cache's HMACs (unset: random per deployment)
    **{
        f"QIE_{name.upper()}": name
        for name in (
            "max_batch_size",
            "batch_wait_timeout_s",
            "replicas",
            "autoscale",
            "min_replicas",
            "max_replicas",
            "target_ongoing_requests",
            "max_ongoing_requests",
            "max_queued_requests",
            "gpus_per_replica",
            "cpus_per_replica",
        )
    },
}
_BY_FIELD = {v.field: v for v in VARIABLES}


def _environ(environ: Environ | None) -> Environ:
    return os.environ if environ is None else environ


def read(name: str, environ: Environ | None = None) -> Any:
    """The parsed value of one `Settings` field, from the environment now (None or False when unset).

    Example:
        >>> read("max_input_bytes", {"QIE_MAX_INPUT_BYTES": "1000"})
        1000
    """
    if name == "safety":
        return _safety(_environ(environ))
    if name == "cache_dir":
        return _cache_dir(_environ(environ))
    if name == "serve":
        env = _environ(environ)
        return {key: env[var] for var, key in SERVE_VARIABLES.items() if var in env}
    variable = _BY_FIELD[name]
    text = _environ(environ).get(variable.name)
    value = None if text is None else variable.parse(variable.name, text)
    return variable.default if value is None else value


def _cache_dir(environ: Environ) -> Path:
    given = _BY_FIELD["cache_dir"]
    return _path(given.name, environ.get(given.name, "")) or Path.home() / ".cache" / "qie"


def _safety(environ: Environ) -> SafetySettings | None:
    spec = environ.get(_BY_FIELD["safety"].name, "").strip()
    if spec.lower() in FALSE:
        return None
    checks = read("safety_check", environ) or frozenset({"inputs", "outputs"})
    return SafetySettings(
        model=None if spec.lower() in TRUE else spec,
        threshold=read("safety_threshold", environ),
        inputs="inputs" in checks,
        outputs="outputs" in checks,
        required=read("safety_required", environ),
    )


@dataclass(frozen=True)
class Settings:
    """Every `QIE_*` variable, parsed and validated (see `VARIABLES` for what each one does)."""

    model: str | None = None
    revision: str | None = None
    device: str | None = None
    dtype: str | None = None
    plan: str | None = None
    vram_budget_gib: float | None = None
    compile: bool = False
    compile_mode: str | None = None
    text_encoder_fp8: bool = False
    vae_compile: str | None = None
    attention: str | None = None
    fast_lora: str | None = None
    fast_steps: int | None = None
    loras: tuple[str, ...] = ()
    safety: SafetySettings | None = None
    fault: str | None = None
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "qie")
    result_cache_dir: Path | None = None
    max_input_pixels: int | None = None
    max_input_bytes: int | None = None
    log_prompts: bool = False
    edit_timeout_s: float = 900.0
    gpu_duration_s: int = 120
    preload: bool = False
    tag_font: str | None = None
    serve: Mapping[str, str] = field(default_factory=dict)  # raw `ServeSettings` values by field name

    @classmethod
    def from_env(cls, environ: Environ | None = None) -> Settings:
        """Read and check every variable; a bad value raises `InvalidRequestError` naming the variable.

        Unknown `QIE_*` names (a typo, most likely) are logged at WARNING and otherwise ignored.
        """
        env = _environ(environ)
        known = {v.name for v in VARIABLES} | set(SERVE_VARIABLES)
        for name in sorted(k for k in env if k.startswith(PREFIX) and k not in known):
            log.warning("%s is not a qie setting and is ignored (known: see qie.settings.VARIABLES)", name)
        return cls(**{f.name: read(f.name, env) for f in fields(cls)})

    @property
    def engine(self) -> dict[str, Any]:
        """The engine fields that are set, by `LoadOptions` field name, with the variable each came from."""
        names = ("model", "revision", "device", "dtype", "plan", "vram_budget_gib", "attention", "fast_lora")
        names += ("fast_steps", "compile_mode", "vae_compile")
        values = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        for flag in ("compile", "text_encoder_fp8"):
            if getattr(self, flag):
                values[flag] = True
        if self.loras:
            values["loras"] = self.loras
        return values


def variable_for(field_name: str) -> str:
    """The variable that sets `field_name` (for error messages), e.g. "vram_budget_gib" -> "QIE_VRAM_BUDGET"."""
    return _BY_FIELD[field_name].name
