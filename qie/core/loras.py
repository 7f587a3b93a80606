"""User LoRAs: adapters (styles, subjects, tasks) fused into the transformer once, at load.

A LoRA is given as `PATH_OR_REPO[:SCALE]`: a .safetensors file, a folder holding one, a hub repo
id (`owner/name`) or a file in one (`owner/name/file.safetensors`), optionally followed by its
scale (default 1). diffusers' `lora_state_dict` reads the diffusers, Kohya (`lora_unet_...`) and
Lightning (`diffusion_model....lora_down/up` + `alpha`) key formats; every key is then checked
against the loaded transformer (module present, shapes matching) before anything is loaded, so a
LoRA for another model fails with the first key that does not fit, not with a silent no-op.

Each LoRA is loaded, fused at its scale (`fuse_lora`) and unloaded again: no extra work per step,
and the weights the memory plan then quantizes or streams already hold it (so LoRAs work on the
fp8 and streaming plans too).

Example:
    >>> LoraSpec.parse("styles/ink.safetensors:0.8")
    LoraSpec(source='styles/ink.safetensors', scale=0.8)
    >>> fuse_loras(pipe, [LoraSpec.parse("owner/ink-lora")])  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qie.errors import InvalidRequestError, ModelLoadError

log = logging.getLogger(__name__)

MAX_ABS_SCALE = 10.0
ADAPTER_PREFIX = "user-lora"
# What a converted LoRA key may end with; the rest of the key is the transformer module it adapts.
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")
LORA_FORMATS = "diffusers, Kohya or Lightning key format"


@dataclass(frozen=True)
class LoraSpec:
    """One user LoRA: where it is and how strongly it is fused."""

    source: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.source.strip():
            raise InvalidRequestError("lora", self.source, "give PATH_OR_REPO[:SCALE], e.g. styles/ink.safetensors:0.8")
        if not (math.isfinite(self.scale) and abs(self.scale) <= MAX_ABS_SCALE):
            raise InvalidRequestError(
                "lora", f"{self.source}:{self.scale}", f"give a scale from -{MAX_ABS_SCALE:g} to {MAX_ABS_SCALE:g}"
            )

    @classmethod
    def parse(cls, text: str | LoraSpec) -> LoraSpec:
        """`PATH_OR_REPO[:SCALE]`; a colon not followed by a number belongs to the path."""
        if isinstance(text, LoraSpec):
            return text
        head, sep, tail = str(text).rpartition(":")
        try:
            scale = float(tail) if sep and head else None
        except ValueError:
            scale = None
        return cls(str(text)) if scale is None else cls(head, scale)

    @property
    def name(self) -> str:
        """A short name for metadata and notes: the file name, or the repo id."""
        path = Path(self.source).expanduser()
        return path.name if path.exists() else self.source

    @property
    def label(self) -> str:
        return f"{self.name}:{self.scale:g}"


def lora_notes(loras: Sequence[LoraSpec]) -> tuple[str, ...]:
    """The result note naming the fused LoRAs and their scales (none without LoRAs)."""
    return (f"LoRAs fused: {', '.join(lora.label for lora in loras)}",) if loras else ()


def fuse_loras(pipe: Any, loras: Sequence[str | LoraSpec]) -> tuple[LoraSpec, ...]:
    """Check, load and fuse each LoRA into `pipe.transformer`, in order; returns them parsed.

    Raises `ModelLoadError` for a file that cannot be read or is not a LoRA for this transformer.
    """
    specs = tuple(LoraSpec.parse(lora) for lora in loras)
    for index, lora in enumerate(specs):
        state = read_lora(pipe, lora)
        adapter = f"{ADAPTER_PREFIX}-{index}"
        pipe.load_lora_weights(state, adapter_name=adapter)
        pipe.fuse_lora(components=["transformer"], lora_scale=lora.scale, adapter_names=[adapter])
        pipe.unload_lora_weights()
        log.info("LoRA %s fused at scale %g (%d tensors)", lora.source, lora.scale, len(state))
    return specs


def read_lora(pipe: Any, lora: LoraSpec) -> dict[str, Any]:
    """The LoRA's tensors in diffusers' key format, checked against `pipe.transformer`."""
    try:
        location = _location(lora.source)
        state = pipe.lora_state_dict(**location)
    except OSError as exc:
        raise ModelLoadError(
            f"lora={lora.source!r} cannot be read ({_first_line(exc)}). Give a .safetensors file, "
            "a folder holding one, a hub repo id (owner/name) or owner/name/file.safetensors."
        ) from exc
    except (KeyError, ValueError, IndexError, RuntimeError) as exc:  # diffusers' key conversion gave up
        key = _foreign_key(location, pipe.transformer)
        raise ModelLoadError(
            f"lora={lora.source!r} is not a LoRA for this model: its key {key!r} does not map onto the "
            f"Qwen-Image transformer ({_first_line(exc)}). Use a LoRA trained for Qwen-Image-Edit ({LORA_FORMATS})."
        ) from exc
    check_lora_keys(state, pipe.transformer, lora.source)
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def _foreign_key(location: dict[str, Any], transformer: Any) -> str:
    """The first key of a local LoRA file that names no top-level part of `transformer` ("?" if unknown)."""
    from safetensors import safe_open

    path = Path(location["pretrained_model_name_or_path_or_dict"]) / location.get("weight_name", "")
    if not path.is_file():
        return "?"
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    tops = tuple(name for name, _ in transformer.named_children())
    for key in keys:
        bare = key.removeprefix("lora_unet_").removeprefix("diffusion_model.").removeprefix("transformer.")
        if not bare.startswith(tops):
            return key
    return keys[0] if keys else "?"


def check_lora_keys(state: dict[str, Any], transformer: Any, source: str) -> None:
    """Raise `ModelLoadError` naming the first key that is not a LoRA weight for `transformer`."""
    import torch

    if not state:
        raise ModelLoadError(f"lora={source!r} holds no LoRA weights ({LORA_FORMATS} expected).")
    modules = dict(transformer.named_modules())
    for key, tensor in state.items():
        problem = _key_problem(key.removeprefix("transformer."), tensor, modules, torch.nn.Linear)
        if problem:
            raise ModelLoadError(
                f"lora={source!r} is not a LoRA for this model: its key {key!r} (in diffusers' naming) {problem}. "
                f"Use a LoRA trained for Qwen-Image-Edit ({LORA_FORMATS})."
            )


def _key_problem(key: str, tensor: Any, modules: dict[str, Any], linear: type) -> str | None:
    suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
    if suffix is None:
        return "is not a LoRA weight (lora_A/lora_B, lora_down/lora_up)"
    name = key[: -len(suffix)]
    module = modules.get(name)
    if not isinstance(module, linear):
        return f"names no linear layer of the transformer ({name!r})"
    if suffix == ".lora_A.weight" and tensor.shape[-1] != module.in_features:
        return f"has shape {tuple(tensor.shape)}, the layer takes {module.in_features} inputs"
    if suffix != ".lora_A.weight" and tensor.shape[0] != module.out_features:
        return f"has shape {tuple(tensor.shape)}, the layer gives {module.out_features} outputs"
    return None


def _location(source: str) -> dict[str, Any]:
    path = Path(source).expanduser()
    if path.is_file():
        return {"pretrained_model_name_or_path_or_dict": str(path)}
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(f"{path} holds {len(files)} .safetensors files; give the file itself")
        return {"pretrained_model_name_or_path_or_dict": str(path), "weight_name": files[0].name}
    local = source.startswith(("/", ".", "~")) or (path.suffix == ".safetensors" and source.count("/") < 2)
    if local or source.count("/") < 1:
        raise FileNotFoundError(f"no such file or folder: {path}")
    owner, name, *rest = source.split("/")
    if rest:  # owner/name/sub/folder/file.safetensors
        *folders, weight = rest
        hub = {"pretrained_model_name_or_path_or_dict": f"{owner}/{name}", "weight_name": weight}
        return {**hub, "subfolder": "/".join(folders)} if folders else hub
    return {"pretrained_model_name_or_path_or_dict": source}
