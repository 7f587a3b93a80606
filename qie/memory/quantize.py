"""Quantized transformer weights through torchao: fp8 where the GPU has fp8 units, int8 elsewhere.

fp8 (compute capability >= 8.9, e.g. L4, L40S, H100): `Float8DynamicActivationFloat8WeightConfig`
with per-row scales, so the matrix products run on fp8 tensor cores. Older GPUs get int8
weight-only quantization (half the memory, bf16 compute). Only `nn.Linear` layers inside the
transformer blocks are quantized; embeddings, norms and the output projection stay bf16.
"""

from __future__ import annotations

import logging

import torch

from qie.errors import ResourceError

log = logging.getLogger(__name__)


def has_fp8(device: torch.device) -> bool:
    """True on CUDA GPUs with fp8 tensor cores (compute capability 8.9 or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


# What torchao's `recommended_inductor_config_setter` sets for the whole process (torchao 0.18).
TORCHAO_INDUCTOR_OPTIONS = {
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "force_fuse_int_mm_with_mul": True,
    "fx_graph_cache": True,
    "triton.unique_kernel_names": True,
}
# What qie gives the quantized blocks' compile alone (`qie.speed.compile.compile_kwargs`): torchao's
# options without coordinate-descent tuning, which made the first compile 129 s longer for no faster
# forward (h200-am, 8 fp8 blocks from an empty cache: 140.5 s and 29.08 ms on, 11.7 s and 28.71 ms off).
QUANTIZED_INDUCTOR_OPTIONS = {k: v for k, v in TORCHAO_INDUCTOR_OPTIONS.items() if not k.startswith("coordinate")}


def quantize_transformer(transformer: torch.nn.Module, device: torch.device, fuse_mlp: bool = True) -> str:
    """Quantize the Linear layers of `transformer`'s blocks in place; returns "fp8" or "int8".

    With fp8, `fuse_mlp` also fuses each block MLP's GELU with the fp8 quantization of its output
    (`qie.memory.fp8_mlp`: one pass instead of a looped reduction).
    """
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8WeightOnlyConfig,
            PerRow,
            quantize_,
        )
    except ImportError as exc:
        raise ResourceError(
            "the fp8/int8 plans need torchao (`pip install torchao`, GPU machines only); "
            "or use plan='resident' / plan='stream'"
        ) from exc

    def in_blocks(module: torch.nn.Module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and fqn.startswith("transformer_blocks.")

    fp8 = has_fp8(device)
    if fp8:
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    else:
        log.warning("GPU has no fp8 units (compute capability < 8.9): using int8 weight-only quantization instead")
        config = Int8WeightOnlyConfig(set_inductor_config=False)
    quantize_(transformer, config, filter_fn=in_blocks)
    # torchao would set its recommended Inductor options for the whole process (and every later
    # compile, such as the VAE decoder's); the blocks' compile alone gets qie's (see above).
    transformer._qie_inductor_options = dict(QUANTIZED_INDUCTOR_OPTIONS)
    if fp8 and fuse_mlp:
        from qie.memory.fp8_mlp import fuse_mlp_quantization

        fuse_mlp_quantization(transformer)
    return "fp8" if fp8 else "int8"


# Kept in the compute dtype: the token and patch embeddings (a lookup would upcast the whole table)
# and the LM head (one token's logits per edit).
TEXT_ENCODER_FP8_SKIP = ("embed", "lm_head")


def store_text_encoder_fp8(text_encoder: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Store `text_encoder`'s Linear and conv weights in fp8 (e4m3), upcast to `compute_dtype` for each call.

    diffusers' layerwise casting: half the bf16 memory (the 8.3B Qwen2.5-VL encoder: ~16 GiB -> ~9 GiB),
    one upcast per layer per call, on any device. Returns how many weights are now stored in fp8.

    Example:
        >>> store_text_encoder_fp8(pipe.text_encoder, torch.bfloat16)  # doctest: +SKIP
        197
    """
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting

    apply_layerwise_casting(
        text_encoder,
        storage_dtype=torch.float8_e4m3fn,
        compute_dtype=compute_dtype,
        skip_modules_pattern=TEXT_ENCODER_FP8_SKIP,
    )
    stored = sum(1 for p in text_encoder.parameters() if p.dtype == torch.float8_e4m3fn)
    log.info("text encoder: %d weights stored in fp8, computed in %s", stored, compute_dtype)
    return stored
