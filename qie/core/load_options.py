"""`LoadOptions`: how one process loads its editor (model, device, dtype, memory plan, speed setup).

One frozen dataclass, checked once when built, shared by the three adapters: the CLI and the
Ray Serve service add its flags with `add_arguments` and read them back with `from_args`, the web
app does the same, and `from_env` reads the `QIE_*` variables (through `qie.settings`). Errors name
the flag (`--vram-budget`) when built from a command line, the variable (`QIE_VRAM_BUDGET`) when
built from the environment, and the Python name (`vram_budget_gib`) otherwise.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> LoadOptions.add_arguments(parser)
    >>> LoadOptions.from_args(parser.parse_args(["--model", "tiny", "--vram-budget", "12"])).vram_budget_gib
    12.0
    >>> LoadOptions(model="tiny", plan="stream").plan
    'stream'
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from qie.core.loras import LoraSpec
from qie.core.registry import MODELS, REAL_MODEL_ID
from qie.errors import InvalidRequestError
from qie.settings import SafetySettings, Settings, check_fault, variable_for
from qie.speed.options import COMPILE_MODES, TRANSFORMER_GRAPHS_MODES, VAE_COMPILE_MODES

# Allowed values live with the type that uses them (tests check them against the mechanisms).
PLAN_NAMES = ("auto", "resident", "resident-fp8", "fp8-te-stream", "stream", "model-offload")
DTYPE_NAMES = ("bf16", "fp16", "fp32", "bfloat16", "float16", "float32")
FAST_STEPS = tuple(sorted({n for spec in MODELS.values() if spec.lightning for n in spec.lightning.steps}))
_DEVICE = re.compile(r"[a-z]+(:\d+)?")
# The plans that keep every weight on the GPU with no budget in force. On them `vae_compile="auto"`
# compiles the VAE (decoder, encoder) with the transformer (it runs untiled there, as measured: h200-ai, h200-an;
# under the budget plans the VAE may run in tiles and the compiled VAE's memory is not measured;
# `vae_compile="on"` asks anyway), and `transformer_graphs` may keep its graphs' memory pool.
RESIDENT_PLANS = ("resident", "resident-fp8")
AUTO_VAE_COMPILE_PLANS = RESIDENT_PLANS


def auto_vae_compile(vae_compile: str, plan: str) -> str:
    """The VAE's compile that `Editor.enable_compile` adds for `vae_compile` on `plan`: "on" for
    "auto" on `AUTO_VAE_COMPILE_PLANS`, else "off" (the other values compile at load, or never).

    Example:
        >>> [auto_vae_compile(mode, plan) for mode, plan in [("auto", "resident-fp8"), ("auto", "stream")]]
        ['on', 'off']
    """
    return "on" if vae_compile == "auto" and plan in AUTO_VAE_COMPILE_PLANS else "off"


# Command-line flag and argparse destination of each field that has a flag.
FLAGS = {
    "model": "--model",
    "revision": "--revision",
    "device": "--device",
    "dtype": "--dtype",
    "plan": "--plan",
    "vram_budget_gib": "--vram-budget",
    "compile": "--compile",
    "compile_mode": "--compile-mode",
    "attention": "--attention",
    "fast_lora": "--fast-lora",
    "fast_steps": "--fast-steps",
    "fast_fuse": "--fast-fuse",
    "text_encoder_fp8": "--text-encoder-fp8",
    "vae_compile": "--vae-compile",
    "transformer_graphs": "--transformer-graphs",
    "loras": "--lora",
}


def _dest(name: str) -> str:
    return FLAGS[name].removeprefix("--").replace("-", "_") if name in FLAGS else name


@dataclass(frozen=True)
class LoadOptions:
    """How to load an `Editor` (see `Editor.load`). Checked when built; bad values raise `InvalidRequestError`.

    `attention` names a diffusers attention backend ("auto": the fastest available; checked at load,
    where the hardware is known); `fast_lora` (file, folder or hub id of the Lightning LoRA) enables
    fast mode with `fast_steps` steps, fused into the weights unless `fast_fuse` is False. `safety`
    and `fault` come from the environment in the adapters (`qie.settings`): the safety filter and
    a fault drill (`component:error[:after[:times]]`) armed at load. `compile_mode` is the
    `torch.compile` mode of the regional compile (with `compile`); `text_encoder_fp8` stores the text
    encoder's weights in fp8 (upcast per layer); `vae_compile` compiles the VAE decoder and encoder ("on"), in
    channels-last layout too ("channels-last"), or ("auto") with the transformer on the resident plans;
    `transformer_graphs` replays the transformer's forward as CUDA graphs where edits repeat their shapes
    ("auto": with `compile` on the resident plans; "on": on those plans compiled or not; "off").
    """

    model: str = REAL_MODEL_ID
    revision: str | None = None
    device: str | None = None
    dtype: Any = None  # "bf16", "fp16", "fp32", a torch.dtype, or None: bf16 on GPU, fp32 on CPU
    plan: str = "auto"
    vram_budget_gib: float | None = None
    compile: bool = False
    compile_mode: str = "default"
    attention: str | None = "auto"
    fast_lora: str | None = None
    fast_steps: int = 8
    fast_fuse: bool = True
    text_encoder_fp8: bool = False
    vae_compile: str = "auto"
    transformer_graphs: str = "auto"
    loras: tuple[str, ...] = ()
    fixes: Mapping[str, bool] | None = None
    safety: SafetySettings | None = None
    fault: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.loras, str) or not isinstance(self.loras, tuple):  # a list from argparse
            object.__setattr__(self, "loras", (self.loras,) if isinstance(self.loras, str) else tuple(self.loras))
        for name, value, fix in self._problems():
            raise InvalidRequestError(name, value, fix)

    def _problems(self) -> list[tuple[str, Any, str]]:
        problems = []
        if not isinstance(self.model, str) or not self.model.strip():
            problems.append(("model", self.model, f"give one of {', '.join(MODELS)}, a hub id or a local folder"))
        if self.plan not in PLAN_NAMES:
            problems.append(("plan", self.plan, f"use one of {', '.join(PLAN_NAMES)}"))
        if isinstance(self.dtype, str) and self.dtype not in DTYPE_NAMES:
            problems.append(("dtype", self.dtype, "use bf16, fp16 or fp32 (or leave it unset)"))
        if self.device is not None and not _DEVICE.fullmatch(str(self.device)):
            problems.append(("device", self.device, "use cuda, cuda:N or cpu (or leave it unset: CUDA when present)"))
        budget = self.vram_budget_gib
        if budget is not None and (not isinstance(budget, int | float) or not math.isfinite(budget) or budget <= 0):
            problems.append(("vram_budget_gib", budget, "give the GiB the plan may use, e.g. 16 (unset: free VRAM)"))
        if self.fast_steps not in FAST_STEPS:
            problems.append(("fast_steps", self.fast_steps, "use 4 or 8 (the Lightning LoRAs that exist)"))
        if self.attention is not None and not str(self.attention).strip():
            problems.append(("attention", self.attention, "name a diffusers backend, or 'auto'"))
        if self.compile_mode not in COMPILE_MODES:
            problems.append(("compile_mode", self.compile_mode, f"use one of {', '.join(COMPILE_MODES)}"))
        if self.vae_compile not in VAE_COMPILE_MODES:
            problems.append(("vae_compile", self.vae_compile, f"use one of {', '.join(VAE_COMPILE_MODES)}"))
        if self.transformer_graphs not in TRANSFORMER_GRAPHS_MODES:
            choices = ", ".join(TRANSFORMER_GRAPHS_MODES)
            problems.append(("transformer_graphs", self.transformer_graphs, f"use one of {choices}"))
        for lora in self.loras:
            try:
                LoraSpec.parse(lora)
            except InvalidRequestError as exc:
                problems.append(("loras", lora, exc.fix))
        if self.fault is not None:
            check_fault("fault", self.fault)
        return problems

    # --- from the three sources ---------------------------------------------------------------
    @classmethod
    def build(cls, values: Mapping[str, Any], names: Mapping[str, str] | None = None) -> LoadOptions:
        """`LoadOptions(**values)`, with a bad value's error naming it as `names` does (flag, variable)."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            name = sorted(unknown)[0]
            raise InvalidRequestError(name, values[name], f"unknown load option; use one of {_field_names()}")
        try:
            return cls(**values)
        except InvalidRequestError as exc:
            if names and exc.param in names:
                raise InvalidRequestError(names[exc.param], exc.value, exc.fix) from None
            raise

    @classmethod
    def from_env(cls, settings: Settings | None = None, **overrides: Any) -> LoadOptions:
        """The options the `QIE_*` variables set (`settings`, or read now), then `overrides`.

        Example:
            >>> LoadOptions.from_env(Settings.from_env({"QIE_MODEL": "tiny", "QIE_PLAN": "stream"})).plan
            'stream'
        """
        settings = settings if settings is not None else Settings.from_env()
        values = {**settings.engine, "safety": settings.safety, "fault": settings.fault}
        names = {name: variable_for(name) for name in settings.engine}
        return cls.build({**values, **overrides}, names)

    @classmethod
    def from_args(cls, namespace: argparse.Namespace) -> LoadOptions:
        """The options in a namespace parsed by a parser that `add_arguments` filled."""
        values = {f.name: getattr(namespace, _dest(f.name)) for f in fields(cls) if hasattr(namespace, _dest(f.name))}
        return cls.build(values, FLAGS)

    @classmethod
    def add_arguments(
        cls, parser: argparse.ArgumentParser, defaults: LoadOptions | None = None, *, skip: tuple[str, ...] = ()
    ) -> None:
        """Add the engine flags (group "engine") with `defaults` (e.g. `from_env()`); `skip` leaves flags out.

        Fields without a flag (and skipped ones) still reach `from_args` through the parser's defaults.
        """
        d = defaults or cls()
        group = parser.add_argument_group("engine", "how the model is loaded (see the docs: memory plans, speed)")
        flags = {
            "model": dict(
                default=d.model,
                help=f"{', '.join(MODELS)} (`python -m qie info`), a hub id or a local folder (default: %(default)s)",
            ),
            "revision": dict(default=d.revision, help="hub revision: branch, tag or commit"),
            "device": dict(default=d.device, help="cuda, cuda:1 or cpu (default: CUDA when present)"),
            "dtype": dict(default=d.dtype, choices=DTYPE_NAMES[:3], help="default: bf16 on GPU, fp32 on CPU"),
            "plan": dict(default=d.plan, choices=PLAN_NAMES, help="memory plan (default: %(default)s)"),
            "vram_budget_gib": dict(
                default=d.vram_budget_gib, type=float, metavar="GIB", help="GiB the plan may use (default: free VRAM)"
            ),
            "compile": dict(
                default=d.compile,
                action=argparse.BooleanOptionalAction,
                help="regional torch.compile + warm-up (CUDA; default: %(default)s)",
            ),
            "compile_mode": dict(
                default=d.compile_mode,
                choices=COMPILE_MODES,
                help=(
                    "torch.compile mode of --compile; reduce-overhead = CUDA graphs, slower so far on an H200 "
                    "(docs/speed-options.md) (default: %(default)s)"
                ),
            ),
            "attention": dict(default=d.attention, help="attention backend (default: %(default)s, the fastest)"),
            "fast_lora": dict(default=d.fast_lora, help="Lightning LoRA for fast mode: file, folder or hub id"),
            "fast_steps": dict(
                default=d.fast_steps, type=int, choices=FAST_STEPS, help="which Lightning LoRA (default: %(default)s)"
            ),
            "fast_fuse": dict(
                default=d.fast_fuse,
                action=argparse.BooleanOptionalAction,
                help="fuse the fast LoRA into the weights (fast mode only) or keep an adapter (default: %(default)s)",
            ),
            "text_encoder_fp8": dict(
                default=d.text_encoder_fp8,
                action=argparse.BooleanOptionalAction,
                help="store the text encoder's weights in fp8, upcast layer by layer (default: %(default)s)",
            ),
            "vae_compile": dict(
                default=d.vae_compile,
                choices=VAE_COMPILE_MODES,
                help="compile the VAE decoder and encoder; channels-last: in channels-last layout too; auto: with "
                "--compile on the resident plans (default: %(default)s)",
            ),
            "transformer_graphs": dict(
                default=d.transformer_graphs,
                choices=TRANSFORMER_GRAPHS_MODES,
                help="replay the transformer's forward as CUDA graphs when edits repeat their sizes and prompt "
                "lengths; auto: with --compile on the resident plans (default: %(default)s)",
            ),
            "loras": dict(
                default=list(d.loras),
                action="append",
                metavar="PATH_OR_REPO[:SCALE]",
                help="a LoRA fused into the model at load: file, folder, hub repo or repo/file; scale default 1. "
                "Repeatable",
            ),
        }
        for name, kwargs in flags.items():
            if name not in skip:
                group.add_argument(FLAGS[name], dest=_dest(name), **kwargs)
        parser.set_defaults(
            **{_dest(f.name): getattr(d, f.name) for f in fields(cls) if f.name not in flags or f.name in skip}
        )

    def replace(self, **changes: Any) -> LoadOptions:
        """A copy with `changes` (checked again)."""
        return replace(self, **changes)


def _field_names() -> list[str]:
    return [f.name for f in fields(LoadOptions)]
