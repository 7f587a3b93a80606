"""How far each option may move an edit away from the stock diffusers reference.

Every speed or memory option registers a `Tolerance` here. The test helper
(`tests/oracle.py`) runs the option against `Editor.reference` on the tiny model and asserts the
declared bound; the GPU benchmark reports the same metrics on full-size random weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Tolerance:
    """Largest allowed difference to the reference, on 8-bit output pixels."""

    max_abs: int  # largest per-pixel difference (0-255)
    min_psnr: float  # dB; math.inf for bit-exact
    why: str


TOLERANCES: dict[str, Tolerance] = {
    "default-no-fixes": Tolerance(0, math.inf, "the staged path runs the pipeline's own ops in the same order"),
    "mm_token_type_ids": Tolerance(
        255, 10.0, "deliberate fix: 3-D M-RoPE positions change the prompt embeddings, so the edit changes"
    ),
    # --- tiled VAE and prompt/condition cache ---
    # --- memory plans and compile (qie/memory/plans.py, qie/speed/compile.py); the GPU benchmark reports the same
    # metrics on full-size random weights (benchmarks/bench-h100-*.json: PSNR 31.6 / 28.5 / 38.3 dB).
    "plan-stream": Tolerance(
        64, 30.0, "transformer weights stored as fp8 with per-row scales, upcast to the compute dtype per block"
    ),
    "plan-stream-fp8": Tolerance(
        128,
        25.0,
        "stream plan on GPUs with fp8 units: fp8 rows multiplied in fp8, activations quantized per token "
        "(full size on an H200: 27.6 dB, the same as torchao's fp8 rowwise)",
    ),
    "plan-resident-fp8": Tolerance(
        128, 25.0, "torchao fp8 weights and dynamic fp8 activations in the transformer's matmuls (GPU only)"
    ),
    "compile": Tolerance(64, 30.0, "Inductor fuses and reorders float ops; results differ by rounding"),
    "rope-real": Tolerance(
        0,
        math.inf,
        "RoPE as real float32 products instead of a complex multiplication (qie.speed.rope): the same "
        "arithmetic, equal outputs in eager on CPU; compiled, it is part of `compile`'s rounding",
    ),
    "qk-prologue-fused": Tolerance(
        8,
        45.0,
        "q/k RMSNorm + RoPE + text/image join in one kernel (qie.speed.qk_prologue): diffusers' roundings; off "
        "CUDA the op is diffusers' arithmetic (equal), the Triton kernel sums each head's squares in another order",
    ),
    "block-prologue-fused": Tolerance(
        16,
        40.0,
        "fp8 blocks: LayerNorm + modulation + fp8 row quantization in one kernel (qie.speed.block_prologue), "
        "diffusers' roundings; off CUDA the op is diffusers' arithmetic (equal), the Triton kernel sums each "
        "row in another order",
    ),
    "condition-area-output": Tolerance(
        32,
        35.0,
        "input images VAE-encoded at the output's area instead of ~1024²: fewer condition tokens; automatic "
        "under 0.6 MP (tiny, 128-512 px outputs: max 9-13, 48-52 dB)",
    ),
    "text-encoder-fp8": Tolerance(
        64,
        30.0,
        "text-encoder weights stored in fp8 (e4m3), upcast per layer: the prompt embeddings round (tiny: 1, 65 dB)",
    ),
    "vae_tiling": Tolerance(
        48, 35.0, "each tile sees zero padding at its edges, hidden by the Hann blend (tiny, 128-px tiles: 22 / 44 dB)"
    ),
    "prompt_cache": Tolerance(0, math.inf, "cached text-encoder outputs and condition latents are the same tensors"),
    # Speed options (qie.core.speed_setup). Bounds hold on the tiny model in tests; the GPU benchmark
    # reports the same metrics on full-size weights.
    "step-cache-fbcache": Tolerance(
        32, 35.0, "blocks 2..n reuse their cached residual when the first block barely changed (tiny: 5, 54 dB)"
    ),
    "step-cache-taylorseer": Tolerance(
        32, 35.0, "between full passes the output is extrapolated to first order (tiny: 5, 52 dB)"
    ),
    "early-exit": Tolerance(
        96, 25.0, "decodes the predicted clean image before the last step: late refinement is lost (tiny: 40, 38 dB)"
    ),
    "attention-quant": Tolerance(
        16, 40.0, "int8 Q·K and fp8/fp16 P·V attention (SageAttention); where unavailable, bf16 attention: exact"
    ),
    "attention-fa3-fp8": Tolerance(
        16,
        40.0,
        "FA3's fp8 forward: Q, K and V cast to fp8 with one scale per sample and head (tiny, reference kernel: "
        "see tests/speed/test_fa3.py)",
    ),
    "vision-attention-masked": Tolerance(
        2,
        50.0,
        "the vision tower's windows in one masked SDPA call instead of one call per window: float rounding only",
    ),
    "text-graphs": Tolerance(
        2,
        50.0,
        "the text encoder's language model replayed as a CUDA graph at the prompt length padded to a multiple of 64 "
        "(qie.speed.text_graphs): causal attention keeps the padding out; matrix products of another height round "
        "differently",
    ),
    "vae-single-frame": Tolerance(
        2,
        50.0,
        "the VAE's causal 3-D convolutions run a lone frame as 2-D convolutions (qie.speed.vae_frames): the same "
        "products without the zero frames, summed in another order",
    ),
    "batching": Tolerance(
        3, 50.0, "a batch pads prompts to one length with a mask; only float rounding of batched kernels changes"
    ),
    "batched-cfg": Tolerance(
        3, 50.0, "both CFG branches in one call: the shorter prompt is padded and masked; only kernel rounding changes"
    ),
    "cfg-parallel": Tolerance(
        0, math.inf, "each branch runs the same ops on another device; predictions are exchanged, not recomputed"
    ),
    "context-parallel": Tolerance(
        16, 35.0, "attention split over GPUs sums in another order; a first bound, not yet measured on GPUs"
    ),
}


@dataclass(frozen=True)
class Difference:
    """Pixel difference between two images of the same size."""

    max_abs: int
    psnr: float

    def within(self, tol: Tolerance) -> bool:
        return self.max_abs <= tol.max_abs and self.psnr >= tol.min_psnr


def difference(a: Image.Image, b: Image.Image) -> Difference:
    """Max absolute difference and PSNR (dB, inf when identical) of two RGB images."""
    if a.size != b.size:
        raise ValueError(f"image sizes differ: {a.size} vs {b.size}")
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
    return Difference(max_abs=int(np.abs(x - y).max()), psnr=psnr)
