"""Random LoRA files in the key formats users bring: diffusers (peft), Kohya and Lightning."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from qie.speed.fast_mode import lora_target_modules

FORMATS = ("diffusers", "kohya", "lightning")


def _keys(name: str, fmt: str) -> tuple[str, str, str | None]:
    """(down, up, alpha) keys of the layer `name` in `fmt`."""
    if fmt == "diffusers":
        return f"transformer.{name}.lora_A.weight", f"transformer.{name}.lora_B.weight", None
    base = f"lora_unet_{name.replace('.', '_')}" if fmt == "kohya" else f"diffusion_model.{name}"
    return f"{base}.lora_down.weight", f"{base}.lora_up.weight", f"{base}.alpha"


def write_lora(
    transformer: torch.nn.Module,
    path: Path,
    fmt: str,
    *,
    rank: int = 2,
    alpha: float = 4.0,
    std: float = 0.3,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Write a random LoRA over every block Linear (modulation included) in `fmt`; return each layer's delta.

    The delta is what fusing at scale 1 must add to the layer's weight: (alpha / rank) * up @ down, or
    up @ down in the diffusers format (no alpha).
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    tensors, deltas = {}, {}
    for name, linear in lora_target_modules(transformer, modulation=True).items():
        down = torch.randn(rank, linear.in_features, generator=generator) * std
        up = torch.randn(linear.out_features, rank, generator=generator) * std
        down_key, up_key, alpha_key = _keys(name, fmt)
        tensors[down_key], tensors[up_key] = down, up
        if alpha_key is not None:
            tensors[alpha_key] = torch.tensor(alpha)
        deltas[name] = (alpha / rank if alpha_key else 1.0) * up @ down
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return deltas
