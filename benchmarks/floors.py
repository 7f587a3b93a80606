"""The physical floor of one transformer forward, per kernel category, from FLOP and byte counts.

`forward_counts` counts the work of one `QwenImageTransformer2DModel` forward from the module
itself (its `nn.Linear` shapes and its config: blocks, heads, head size) and the token counts of the
call; `floors` divides each count by the GPU's peak rate (`PEAKS`). A category's measured time
over its floor says how much is left to gain there.

What is counted:
- gemm: 2·in·out FLOPs per token of every Linear (image-stream layers over the image tokens,
  text-stream layers over the text tokens, modulation layers once per sample), at the fp8 peak
  for fp8-quantized layers and the bf16 peak otherwise; never below the time to read the weights.
- attention: 4·L²·D FLOPs per block (Q·Kᵀ and P·V over the joint sequence L), at the bf16 peak.
- elementwise: the activation round trips the block needs between its GEMMs when each group of
  elementwise ops (norm + modulate, q/k norm + RoPE, gate + residual) is one fused kernel
  (`ELEMENTWISE_PASSES`), at HBM bandwidth. GELU is assumed fused into its GEMM's epilogue.
- quantize: fp8 layers read their bf16 input and write it in fp8 (3 bytes an element), at HBM bandwidth.
- copies and idle: zero; any time there is overhead.

Example:
    >>> counts = forward_counts(pipe.transformer, image_tokens=8192, text_tokens=230)  # doctest: +SKIP
    >>> floors(counts, peaks_for("NVIDIA H200"))["gemm"]  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Peaks:
    """Peak rates of one GPU: dense bf16 and fp8 matmul FLOP/s, HBM bytes/s."""

    name: str
    bf16_flops: float
    fp8_flops: float
    hbm_bytes_s: float


# bf16: the ~800 TFLOP/s measured for large matmuls on H100/H200 (not the datasheet's 989);
# fp8 twice that; HBM from the datasheets.
PEAKS = {
    "H200": Peaks("H200", 800e12, 1.6e15, 4.8e12),
    "H100": Peaks("H100", 800e12, 1.6e15, 3.35e12),
}
DEFAULT_PEAKS = "H200"

# Reads + writes of a (tokens × dim) activation per block, with each op group one fused kernel.
ELEMENTWISE_PASSES = {
    "norm1 + modulate: read x, write the modulated input": 2,
    "q/k RMSNorm + RoPE: read q and k, write them": 4,
    "attention gate + residual: read x and the projected output, write x": 3,
    "norm2 + modulate": 2,
    "MLP gate + residual": 3,
}
FP8_QUANT_BYTES = 3  # per input element: read bf16 (2), write fp8 (1); the amax fused into the read

_TEXT_STREAM = ("txt_", "add_", "to_add_out")
_PER_SAMPLE = ("img_mod", "txt_mod", "norm_out", "time_text_embed")


@dataclass(frozen=True)
class ForwardCounts:
    """FLOPs and bytes of one transformer forward at given token counts."""

    batch: int
    image_tokens: int
    text_tokens: int
    precision: str  # "fp8" when any Linear holds fp8 weights, else "bf16"
    linear_flops_bf16: float
    linear_flops_fp8: float
    attention_flops: float
    weight_bytes: float
    activation_bytes: float
    quantize_bytes: float

    @property
    def flops(self) -> float:
        return self.linear_flops_bf16 + self.linear_flops_fp8 + self.attention_flops

    def as_dict(self) -> dict[str, float | int | str]:
        return {**asdict(self), "flops": self.flops}


def is_fp8(weight: torch.Tensor) -> bool:
    """True for fp8 weights: a float8 dtype, or a tensor subclass holding fp8 (torchao's `Float8Tensor`)."""
    return "float8" in str(weight.dtype) or "float8" in type(weight).__name__.lower()


def _tokens_for(name: str, image: int, text: int) -> int:
    parts = name.split(".")
    if any(p.startswith(_PER_SAMPLE) for p in parts):
        return 1
    if any(p.startswith(_TEXT_STREAM) for p in parts):
        return text
    return image


def forward_counts(transformer: torch.nn.Module, image_tokens: int, text_tokens: int, batch: int = 1) -> ForwardCounts:
    """Count one forward of `transformer` over `image_tokens` (output + condition) and `text_tokens`."""
    cfg = transformer.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    blocks = len(transformer.transformer_blocks)
    flops = {"bf16": 0.0, "fp8": 0.0}
    weight_bytes = quantize_bytes = 0.0
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        tokens = batch * _tokens_for(name, image_tokens, text_tokens)
        fp8 = is_fp8(module.weight)
        flops["fp8" if fp8 else "bf16"] += 2.0 * module.in_features * module.out_features * tokens
        params = module.in_features * module.out_features
        weight_bytes += params * (1 if fp8 else module.weight.element_size())
        if fp8:
            quantize_bytes += FP8_QUANT_BYTES * module.in_features * tokens
    joint = image_tokens + text_tokens
    attention = 4.0 * joint * joint * dim * blocks * batch
    act_bytes = 2  # bf16 activations
    activation = sum(ELEMENTWISE_PASSES.values()) * joint * dim * act_bytes * blocks * batch
    return ForwardCounts(
        batch=batch,
        image_tokens=image_tokens,
        text_tokens=text_tokens,
        precision="fp8" if flops["fp8"] else "bf16",
        linear_flops_bf16=flops["bf16"],
        linear_flops_fp8=flops["fp8"],
        attention_flops=attention,
        weight_bytes=weight_bytes,
        activation_bytes=activation,
        quantize_bytes=quantize_bytes,
    )


def peaks_for(device_name: str | None) -> Peaks:
    """The `PEAKS` entry whose key is in `device_name` ("NVIDIA H200" -> H200), else the H200's."""
    for key, peaks in PEAKS.items():
        if device_name and key.lower() in device_name.lower():
            return peaks
    return PEAKS[DEFAULT_PEAKS]


def floors(counts: ForwardCounts, peaks: Peaks) -> dict[str, float]:
    """Seconds each kernel category needs at least for one forward (`total`: their sum)."""
    gemm_compute = counts.linear_flops_bf16 / peaks.bf16_flops + counts.linear_flops_fp8 / peaks.fp8_flops
    out = {
        "gemm": max(gemm_compute, counts.weight_bytes / peaks.hbm_bytes_s),
        "attention": counts.attention_flops / peaks.bf16_flops,
        "elementwise": counts.activation_bytes / peaks.hbm_bytes_s,
        "quantize": counts.quantize_bytes / peaks.hbm_bytes_s,
        "copies": 0.0,
        "other": 0.0,
        "idle": 0.0,
    }
    out["total"] = sum(out.values())
    return out
