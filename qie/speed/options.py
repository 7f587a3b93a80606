"""Speed option types and values (no torch: `qie.core.request` and `qie.core.registry` use them).

`LightningSpec` says where a model's few-step Lightning LoRAs are published; `qie.speed.fast_mode`
loads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from qie.errors import InvalidRequestError

ATTENTION_QUANT_MODES = ("off", "int8", "fp8")  # qie.speed.attention
STEP_CACHE_MODES = ("off", "fbcache", "taylorseer")  # qie.speed.early_exit
# `torch.compile` modes of the regional compile (qie.speed.compile), and the VAE's compile choices
# ("auto": compiled together with the transformer on the resident plans, `qie.core.load_options`).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
VAE_COMPILE_MODES = ("auto", "off", "on", "channels-last")
# The transformer's forward as CUDA graphs (qie.speed.transformer_graphs): "auto" with the compiled blocks
# on the resident plans, "on" on the resident plans compiled or not, "off".
TRANSFORMER_GRAPHS_MODES = ("auto", "on", "off")

# The scheduler of the Lightning LoRAs' diffusers example (ModelTC/Qwen-Image-Lightning,
# generate_with_diffusers.py), whole. base_shift = max_shift = log(3) makes the dynamic shift
# exp(mu) = 3 whatever the image size ("We use shift=3 in distillation"); no terminal shift.
# It is built from this dict alone: `from_config({**model_config, **changes})` would silently
# drop every change whose key the model's config lists in `_use_default_values`.
LIGHTNING_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": math.log(3),
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


@dataclass(frozen=True)
class LightningSpec:
    """Where a model's published Lightning LoRAs live.

    `files` maps a step count to the file for each precision ("bf16", "fp32") that exists;
    `folder` is the folder inside `repo` ("" for its root).
    """

    repo: str
    folder: str
    files: dict[int, dict[str, str]]

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(sorted(self.files))

    def weight_name(self, steps: int, precision: str) -> str:
        """The file for `steps` in `precision` ("bf16" or "fp32"), or in the one that exists."""
        if steps not in self.files:
            raise InvalidRequestError("fast_steps", steps, f"use one of {self.steps} (the published Lightning LoRAs)")
        by_precision = self.files[steps]
        return by_precision.get(precision) or next(iter(by_precision.values()))

    def location(self, weight: str) -> str:
        """`repo/folder/weight` as a download hint."""
        return "/".join(part for part in (self.repo, self.folder, weight) if part)
