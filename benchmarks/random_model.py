"""Full-size Qwen-Image-Edit pipelines (2509 or 2511) with random weights, for benchmarks without downloads.

The transformer and VAE use diffusers' class defaults (the published full-size configs; variant
"2511" sets the transformer's `zero_cond_t`, the only config difference); the text
encoder uses Qwen2.5-VL-7B's published config. Parameters are created on the meta device, given
storage with `to_empty` directly on the GPU in bf16, and filled from a seeded generator: the same
FLOPs and bytes as the real model, built in seconds, identical for the same seed. Buffers (RoPE
frequency tables) are computed on the host and copied over, since `to_empty` leaves them garbage.
The tokenizer and processor are qie's offline ones (`qie.core.tiny`); only the prompt's token ids differ
from the real tokenizer's, not the sequence shapes the GPU sees.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# Qwen2.5-VL-7B-Instruct's published config (text and vision tower).
QWEN25_VL_7B_TEXT: dict[str, Any] = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
QWEN25_VL_7B_VISION: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
}


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


@torch.no_grad()
def init_random_(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Fill parameters: N(0, std) for matrices and kernels, 1 for norm scales, 0 for biases."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if _is_norm(module) or name in ("gamma", "scale"):
                p.fill_(1.0) if name != "bias" else p.zero_()
            elif p.dim() >= 2:
                p.normal_(0.0, std, generator=gen)
            else:
                p.zero_()


def materialize(build, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """Build a module with `build()` on meta, give it storage on `device` in `dtype`, init it."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = build()
    buffers = {name: buf.clone() for name, buf in model.named_buffers()}
    model = model.to(dtype).to_empty(device=device)
    for name, buf in model.named_buffers():
        buf.copy_(buffers[name])
    init_random_(model, seed)
    return model.eval()


def scaled_configs(
    text_layers: int | None = None, vision_depth: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Qwen2.5-VL-7B's text and vision configs, full width, with fewer layers where given.

    A shallower vision tower keeps the published full-attention blocks that still exist (its last
    block when none does).
    """
    text = dict(QWEN25_VL_7B_TEXT)
    vision = dict(QWEN25_VL_7B_VISION)
    if text_layers is not None:
        text["num_hidden_layers"] = text_layers
    if vision_depth is not None:
        full = [i for i in vision["fullatt_block_indexes"] if i < vision_depth] or [vision_depth - 1]
        vision.update(depth=vision_depth, fullatt_block_indexes=full)
    return text, vision


def build_random_pipeline(
    device: torch.device | str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    variant: str = "2509",
    *,
    transformer_layers: int | None = None,
    text_layers: int | None = None,
    vision_depth: int | None = None,
):
    """A full-size `QwenImageEditPlusPipeline` of `variant` ("2509"/"2511") with random weights on `device`.

    `transformer_layers`, `text_layers` and `vision_depth` scale it down in depth only (every layer
    keeps the real width and shapes), e.g. for host-RAM measurements on a small machine.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from qie.core.registry import check_variant
    from qie.core.tiny import SCHEDULER_CONFIG, TinyQwen2VLProcessor, build_tokenizer, text_encoder_config

    zero_cond_t = check_variant(variant) == "2511"
    device = torch.device(device)
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    processor = TinyQwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer)
    te_config = text_encoder_config(tokenizer, *scaled_configs(text_layers, vision_depth))
    layers = {} if transformer_layers is None else {"num_layers": transformer_layers}
    pipe = QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=materialize(AutoencoderKLQwenImage, device, dtype, seed + 1),
        text_encoder=materialize(lambda: Qwen2_5_VLForConditionalGeneration(te_config), device, dtype, seed + 2),
        tokenizer=tokenizer,
        processor=processor,
        transformer=materialize(
            lambda: QwenImageTransformer2DModel(zero_cond_t=zero_cond_t, **layers), device, dtype, seed + 3
        ),
    )
    log.info("built the full-size random %s pipeline on %s in %.1fs", variant, device, time.perf_counter() - start)
    return pipe
