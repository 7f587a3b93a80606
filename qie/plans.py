"""Memory plans: how the pipeline's components are placed on the device, applied once at load.

A plan is a small named config with an `apply(pipe, device)` function; `choose_plan` picks the
first plan, fastest first, whose predicted need fits the free memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import InvalidRequestError

log = logging.getLogger(__name__)

GIB = 2**30
ACTIVATIONS_GIB = 4.5  # activations and workspace of a 1024² edit with CFG (measured peak - resident)


@dataclass(frozen=True)
class Plan:
    """A named placement of the pipeline on a device."""

    name: str
    description: str
    apply: Callable[[object, torch.device], None]
    need_gib: Callable[[float, float], float]  # (transformer+VAE GiB, text encoder GiB) -> GiB needed


def _resident(pipe, device: torch.device) -> None:
    pipe.to(device)


def _model_offload(pipe, device: torch.device) -> None:
    # diffusers' own hook: each component moves to the GPU for its stage, then back to the host.
    pipe.enable_model_cpu_offload(device=device)


PLANS: dict[str, Plan] = {
    "resident": Plan(
        "resident", "every component on the device", _resident, lambda dit, te: dit + te + ACTIVATIONS_GIB
    ),
    "model-offload": Plan(
        "model-offload",
        "components moved to the GPU one stage at a time (diffusers enable_model_cpu_offload)",
        _model_offload,
        lambda dit, te: max(dit, te) + ACTIVATIONS_GIB,
    ),
}


def component_gib(pipe) -> tuple[float, float]:
    """(transformer + VAE, text encoder) weight sizes in GiB."""

    def size(module) -> float:
        return sum(p.numel() * p.element_size() for p in module.parameters()) / GIB

    return size(pipe.transformer) + size(pipe.vae), size(pipe.text_encoder)


def choose_plan(pipe, device: torch.device, plan: str = "auto", budget_gib: float | None = None) -> Plan:
    """The plan named `plan`, or with "auto" the fastest one that fits `budget_gib` (default: free VRAM)."""
    if plan != "auto":
        if plan not in PLANS:
            raise InvalidRequestError("plan", plan, f"use 'auto' or one of {sorted(PLANS)}")
        return PLANS[plan]
    if device.type != "cuda":
        return PLANS["resident"]
    if budget_gib is None:
        free, _ = torch.cuda.mem_get_info(device)
        budget_gib = free / GIB
    dit, te = component_gib(pipe)
    for candidate in PLANS.values():
        need = candidate.need_gib(dit, te)
        if need <= budget_gib:
            log.info("memory plan %r: needs ~%.1f GiB, %.1f GiB available", candidate.name, need, budget_gib)
            return candidate
        log.info("memory plan %r skipped: needs ~%.1f GiB, %.1f GiB available", candidate.name, need, budget_gib)
    from .errors import ResourceError

    smallest = min(p.need_gib(dit, te) for p in PLANS.values())
    raise ResourceError(
        f"no memory plan fits: the smallest needs ~{smallest:.1f} GiB of GPU memory, {budget_gib:.1f} GiB is free"
    )
