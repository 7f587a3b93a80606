"""Loading the models of the registry (`qie.core.registry`) with the dtype policy.

`load_pipeline` turns a `--model` value (a registry name, a hub id or a local directory) into a
`QwenImageEditPlusPipeline` through diffusers' `from_pretrained`, honouring `HF_HOME`,
`HF_HUB_OFFLINE` and a revision. The tiny models are saved once to a cache directory and loaded
through the same `from_pretrained` path as the real ones.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from qie.core.registry import DEFAULT_MODEL, ResolvedModel, resolve_model
from qie.errors import ModelLoadError, ResourceError

if TYPE_CHECKING:
    import torch
    from diffusers import QwenImageEditPlusPipeline

log = logging.getLogger(__name__)


def prefer_expandable_segments() -> None:
    """Ask PyTorch's CUDA allocator for growable segments (a value the user set wins).

    They fragment far less when a memory plan runs close to its budget. Call it before CUDA
    starts; it reads no torch state.
    """
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def resolve_device(device: str | None = None) -> torch.device:
    """`device`, or CUDA when available, else CPU."""
    import torch

    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """The dtype policy: bf16 where supported, fp16 on pre-Ampere GPUs, fp32 on CPU.

    An explicit `dtype` ("bf16", "fp16", "fp32" or a torch dtype) wins.
    """
    import torch

    names = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
    if isinstance(dtype, str):
        if dtype not in names:
            from qie.errors import InvalidRequestError

            raise InvalidRequestError("dtype", dtype, f"use one of {sorted(set(names))}")
        return names[dtype]
    if dtype is not None:
        return dtype
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        log.warning(
            "GPU %s has no bf16 support; using fp16 (VAE falls back to fp32 on overflow)",
            torch.cuda.get_device_name(device),
        )
        return torch.float16
    if device.type == "cpu":
        log.info("running on CPU: using fp32")
    return torch.float32


def tiny_model_dir(seed: int = 0, variant: str = "2509") -> Path:
    """Where a tiny pipeline is saved (built on first use): `$QIE_CACHE` or ~/.cache/qie."""
    from qie.settings import read as read_setting
    from qie.versions import __version__

    flavour = "" if variant == "2509" else f"-{variant}"
    path = read_setting("cache_dir") / f"tiny{flavour}-{__version__}-seed{seed}"
    if not (path / "model_index.json").is_file():
        from qie.core.tiny import save_tiny_pipeline

        log.info("building the tiny offline %s pipeline in %s", variant, path)
        tmp = path.with_name(path.name + f".building-{os.getpid()}")
        save_tiny_pipeline(tmp, seed=seed, variant=variant)
        try:
            tmp.replace(path)
        except OSError:  # another process finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_pipeline(
    model: str | ResolvedModel = DEFAULT_MODEL,
    *,
    device: torch.device,
    dtype: torch.dtype,
    revision: str | None = None,
) -> QwenImageEditPlusPipeline:
    """Load `model` (a registry name, a hub id or a local directory) with `from_pretrained`.

    Weights are loaded straight into `dtype` (no fp32 copy in host RAM). `revision` defaults to
    the registry's. Raises `ModelLoadError` with what to do when the weights are missing and there
    is no network.
    """
    from diffusers import QwenImageEditPlusPipeline

    resolved = model if isinstance(model, ResolvedModel) else resolve_model(model)
    tiny = resolved.spec is not None and resolved.spec.is_tiny
    source = tiny_model_dir(variant=resolved.spec.variant) if tiny else resolved.source
    local = Path(source).is_dir()
    if local:
        _import_custom_components(Path(source))
    kwargs: dict = {"dtype": dtype}
    revision = revision or (resolved.spec.revision if resolved.registered else None)
    if revision and not local:
        kwargs["revision"] = revision
    if tiny:
        kwargs["disable_mmap"] = True  # bit-identical reloads
    try:
        return QwenImageEditPlusPipeline.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(_missing_weights_message(str(source), local, exc)) from exc


def resolve_target(model: str, device: str | None, *, quiet: bool = False) -> tuple[ResolvedModel, torch.device]:
    """The model and device an editor loads (`device` None: CUDA when present), refused early: an unknown
    model, or a registered GPU model where no GPU was found and none was asked for (`check_hardware`).
    Imports no model code, so the CLI checks its flags with it first. `quiet`: see `resolve_model`."""
    resolved = resolve_model(model, quiet=quiet)
    target = resolve_device(device)
    if device is None:
        check_hardware(resolved, target)
    return resolved, target


def check_hardware(model: ResolvedModel, device: torch.device) -> None:
    """Refuse early, with the numbers, when the device cannot hold a registered model at all."""
    spec = model.spec
    if not model.registered or spec is None or not spec.needs_gpu or device.type != "cpu":
        return
    raise ResourceError(
        f"model={spec.source!r} needs a CUDA GPU (its weights are {spec.weights_gib():.0f} GiB in bf16) "
        "and none was found. Run on a GPU machine, pass device='cpu' explicitly to try anyway "
        "(very slow, ~{:.0f} GiB of RAM), or use model='tiny' for the offline demo.".format(spec.weights_gib(4))
    )


def _import_custom_components(folder: Path) -> None:
    """Import the modules a saved pipeline names for its components (e.g. the tiny processor).

    diffusers refuses to import a module just because `model_index.json` names it; qie's own
    modules are safe to import, others are left to diffusers' `trust_remote_code` rules.
    """
    index = folder / "model_index.json"
    if not index.is_file():
        return
    for value in json.loads(index.read_text()).values():
        if isinstance(value, list) and value and str(value[0]).startswith("qie."):
            importlib.import_module(value[0])


def _missing_weights_message(source: str, local: bool, exc: Exception) -> str:
    if local:
        return f"model={source!r}: the folder is not a complete diffusers pipeline ({exc})."
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    hub_home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    how = (
        f"model={source!r}: the weights are not in the local cache ({hub_home})"
        + (" and HF_HUB_OFFLINE is set" if offline else " and could not be downloaded")
        + f". Download them on a machine with network (`hf download {source}`) and copy the cache or "
        "the folder here (pass the folder as --model), or run the offline demo with --model tiny."
    )
    return f"{how} [{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}]"
