"""Fast mode: a model's few-step Lightning LoRA (4 or 8 steps, CFG off).

`load_fast_mode` loads the published LoRA named by the model's `LightningSpec` (for Edit-2509
`lightx2v/Qwen-Image-Lightning`, folder `Qwen-Image-Edit-2509/`; for Edit-2511
`lightx2v/Qwen-Image-Edit-2511-Lightning`), or a local file or folder, with diffusers'
`load_lora_weights` and, by default, fuses it into the transformer weights (`fuse_lora` +
`unload_lora_weights`: no extra work per step). A fused editor runs every request in fast mode;
with `fuse=False` the adapter stays separate and is switched on only for requests with
`mode="fast"` (a little slower per step, but the same editor serves quality requests exactly as
without the LoRA).

The LoRAs were distilled with a fixed time shift of 3 and no terminal shift: fast requests run
with the published Lightning scheduler (`LIGHTNING_SCHEDULER_CONFIG`, built from that whole dict,
never merged into the model's config); the model's own scheduler gives poor images.

`random_lightning_lora` writes a LoRA of the real key format and shapes with random values, for
benchmarks and tests where the published file cannot be downloaded.

Example:
    >>> fast = load_fast_mode(pipe, "lightx2v/Qwen-Image-Lightning", lightning=spec, steps=8)  # doctest: +SKIP
    >>> with fast.active(pipe): ...                                                           # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qie.errors import ModelLoadError
from qie.speed.options import LIGHTNING_SCHEDULER_CONFIG, LightningSpec

log = logging.getLogger(__name__)

ADAPTER = "fast"


@dataclass
class FastMode:
    """A loaded Lightning LoRA: how many steps it runs, its scheduler and whether it is fused."""

    source: str
    steps: int
    fused: bool
    scheduler: Any

    @contextlib.contextmanager
    def active(self, pipe) -> Iterator[str]:
        """Run the body with the Lightning scheduler (and the adapter on, when not fused); yields a note."""
        original = pipe.scheduler
        pipe.scheduler = self.scheduler
        if not self.fused:
            pipe.transformer.enable_lora()
        try:
            yield f"fast mode: Lightning {self.steps}-step LoRA ({self.source}), {self.steps} steps, CFG off"
        finally:
            if not self.fused:
                pipe.transformer.disable_lora()
            pipe.scheduler = original


def load_fast_mode(pipe, source: str, *, lightning: LightningSpec, steps: int = 8, fuse: bool = True) -> FastMode:
    """Load the Lightning LoRA from `source` into `pipe` and return its `FastMode`.

    `source` is a .safetensors file, a folder holding the published file (directly or in the
    spec's folder), or a hub repo id (normally `lightning.repo`). `lightning` names the files of
    the loaded model. Raises `ModelLoadError` when the file cannot be found or read.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    half = pipe.transformer.dtype in (torch.bfloat16, torch.float16)
    weight = lightning.weight_name(steps, "bf16" if half else "fp32")
    try:
        pipe.load_lora_weights(**_lora_location(source, weight, lightning.folder), adapter_name=ADAPTER)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(
            f"fast_lora={source!r} cannot be loaded ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Download {lightning.location(weight)} "
            "and pass the file or its folder."
        ) from exc
    if fuse:
        pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=[ADAPTER])
        pipe.unload_lora_weights()
    else:
        pipe.transformer.disable_lora()  # quality requests run without it
    scheduler = FlowMatchEulerDiscreteScheduler(**LIGHTNING_SCHEDULER_CONFIG)
    log.info("fast mode: %d-step Lightning LoRA from %s (%s)", steps, source, "fused" if fuse else "adapter")
    return FastMode(source=source, steps=steps, fused=fuse, scheduler=scheduler)


def _lora_location(source: str, weight: str, subfolder: str) -> dict[str, Any]:
    path = Path(source).expanduser()
    if path.is_file():
        return {"pretrained_model_name_or_path_or_dict": str(path)}
    if path.is_dir():
        folders = [path, path / subfolder] if subfolder else [path]
        for folder in folders:
            if (folder / weight).is_file():
                return {"pretrained_model_name_or_path_or_dict": str(folder), "weight_name": weight}
        raise FileNotFoundError(f"no {weight} in {' or '.join(str(f) for f in folders)}")
    if path.suffix == ".safetensors" or source.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"no such file or folder: {path}")
    hub = {"pretrained_model_name_or_path_or_dict": source, "weight_name": weight}
    return {**hub, "subfolder": subfolder} if subfolder else hub


def lora_target_modules(transformer: torch.nn.Module, *, modulation: bool = False) -> dict[str, torch.nn.Linear]:
    """The Linear layers of the transformer blocks that the Lightning LoRA adapts.

    Attention projections (8) and MLP layers (4) of every block: 720 matrices in the full model,
    the count loaders report for the Edit-2509 files (DiffSynth-Studio issue #1068). With
    `modulation`, the blocks' img_mod/txt_mod layers too.
    """
    return {
        name: module
        for name, module in transformer.named_modules()
        if name.startswith("transformer_blocks.")
        and isinstance(module, torch.nn.Linear)
        and (modulation or "_mod." not in name)
    }


def random_lightning_lora(
    transformer: torch.nn.Module,
    path: str | Path,
    *,
    rank: int = 64,
    alpha: float = 8.0,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write a random LoRA with the Lightning files' key format and `transformer`'s shapes to `path`.

    Keys are `diffusion_model.<module>.lora_down.weight` (rank x in), `.lora_up.weight` (out x rank)
    and `.alpha`, for the layers of `lora_target_modules`. The defaults (rank 64, alpha 8) are what
    the published Lightning files carry. Works for the full-size transformer (also on the meta
    device: only shapes are read). Values are small, so the delta keeps outputs finite.

    Example:
        >>> random_lightning_lora(pipe.transformer, "lora.safetensors")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    generator = torch.Generator("cpu").manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, linear in lora_target_modules(transformer).items():
        key = f"diffusion_model.{name}"
        down = torch.randn(rank, linear.in_features, generator=generator) / math.sqrt(linear.in_features)
        up = torch.randn(linear.out_features, rank, generator=generator) * (0.01 / math.sqrt(rank))
        tensors[f"{key}.lora_down.weight"] = down.to(dtype)
        tensors[f"{key}.lora_up.weight"] = up.to(dtype)
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
