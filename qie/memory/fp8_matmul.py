"""Linear layers that multiply in fp8 straight from stored fp8 rows (no upcast of the weight).

A weight stored as fp8 (e4m3) values with one fp32 scale per output row (`Fp8Rows` in
`qie.memory.streaming`) can feed the GPU's fp8 tensor cores as it is: the activations are
quantized per row on the fly (dynamic scaling, one fp32 scale per token) and
`torch._scaled_mm` multiplies the two fp8 operands and applies both sets of scales to the
product ("rowwise" scaling, as torchao's float8 rowwise does):

    y[m, n] = (xq[m, :] . wq[n, :]) * sx[m] * sw[n] + b[n]

On a CUDA GPU with fp8 units (compute capability >= 8.9: L4, RTX 4090, H100, ...) that is one
fp8 GEMM per layer; elsewhere the same arithmetic is emulated in float32 (CPU tests, and the
reference the GPU kernel is checked against). GPUs without fp8 units take the upcast path of
the streamer instead (`compute_mode`).

Example:
    >>> w = torch.randn(32, 64)
    >>> values, scales = quantize_rows(w)
    >>> y = scaled_linear(torch.randn(4, 64), values, scales, None)
    >>> tuple(y.shape)
    (4, 32)
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import nn

from qie.memory import few_rows_gemm

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_SCALE = 1e-12  # rows that are all zero get this scale instead of 0 (no division by zero)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` (rows × K) as fp8 values and one fp32 scale per row: x ≈ values * scales.

    Each row's largest magnitude maps to fp8's largest finite value (448).
    """
    xf = x.float()
    scales = fp8_scale(xf.abs().amax(dim=-1, keepdim=True))
    return to_fp8(xf, scales), scales


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The fp32 scale that maps largest magnitudes `amax` to fp8's largest finite value (448)."""
    return (amax.float() / FP8_MAX).clamp(min=MIN_SCALE)


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x / scale` (`scale` broadcast against `x`) cast to fp8 (e4m3), saturating at ±448."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def fp8_available(device: torch.device) -> bool:
    """True on CUDA GPUs with fp8 tensor cores (compute capability 8.9 or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def compute_mode(device: torch.device, requested: str = "auto") -> str:
    """How streamed fp8 rows are multiplied on `device`: "fp8" (scaled matmul) or "upcast" (to bf16).

    "auto" picks "fp8" on CUDA GPUs with fp8 units and "upcast" elsewhere; a CUDA GPU without fp8
    units is logged at WARNING, since it runs the slower upcast path.
    """
    if requested not in ("auto", "fp8", "upcast"):
        raise ValueError(f"compute={requested!r}: use 'auto', 'fp8' or 'upcast'")
    if requested != "auto":
        return requested
    if fp8_available(device):
        return "fp8"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        log.warning(
            "GPU has no fp8 units (compute capability %d.%d < 8.9): streamed fp8 weights are upcast to bf16 "
            "per block before their matmuls (slower than fp8 compute)",
            major,
            minor,
        )
    return "upcast"


def scaled_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`x @ (values * scales).T + bias` with fp8 operands: `values` (N × K, fp8), `scales` (N × 1, fp32).

    On CUDA this is one `torch._scaled_mm` (rowwise scales, fast accumulation); on other devices
    the same quantized arithmetic in float32.
    """
    out_dtype = out_dtype or x.dtype
    lead, k = x.shape[:-1], x.shape[-1]
    xq, xs = quantize_rows(x.reshape(-1, k))
    return scaled_mm_rows(xq, xs, values, scales, bias, out_dtype).reshape(*lead, values.shape[0])


def scaled_mm_rows(
    xq: torch.Tensor,
    xs: torch.Tensor,
    values: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """`(xq * xs) @ (values * scales).T + bias` for fp8 rows on both sides: `xq` (M × K) with `xs` (M × 1),
    `values` (N × K) with `scales` (N × 1). On CUDA one `torch._scaled_mm`, or for few rows the Triton
    kernel that beats it there (`qie.memory.few_rows_gemm`); float32 emulation elsewhere."""
    bias = None if bias is None else bias.to(out_dtype)
    if xq.is_cuda and few_rows_gemm.serves(xq, values):
        return few_rows_gemm.fp8_rows_gemm(xq, xs, values, scales, bias, out_dtype)
    if xq.is_cuda:
        return cublas_rows(xq, xs, values, scales, bias, out_dtype)
    return few_rows_gemm.emulate(xq, xs, values, scales, bias, out_dtype)


def cublas_rows(
    xq: torch.Tensor,
    xs: torch.Tensor,
    values: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """`scaled_mm_rows`' product as one cuBLAS `torch._scaled_mm` at any row count (CUDA; `bias` already in
    `out_dtype`, added in the GEMM's epilogue): what the few-rows kernel is measured against."""
    return torch._scaled_mm(
        xq, values.t(), scale_a=xs, scale_b=scales.t(), bias=bias, out_dtype=out_dtype, use_fast_accum=True
    )


class Fp8RowLinear(nn.Linear):
    """An `nn.Linear` whose `weight` holds fp8 values and `weight_scale` their per-row fp32 scales.

    Made from a plain `nn.Linear` in place by `to_fp8_rows` (same parameters, same names), so the
    streamer can point `weight` and `weight_scale` at packed buffers before each call.
    """

    weight_scale: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_linear(x, self.weight, self.weight_scale, self.bias)

    @classmethod
    def to_fp8_rows(cls, linear: nn.Linear) -> Fp8RowLinear:
        """Turn `linear` into an `Fp8RowLinear` in place (its class and one new, empty buffer)."""
        linear.__class__ = cls
        linear.register_buffer("weight_scale", torch.empty(0, dtype=torch.float32), persistent=False)
        return linear


def fp8_rows(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`linear`'s weight as (fp8 values N × K, fp32 scales N × 1) when it is stored as fp8 rows, else None.

    Two storages qualify: `Fp8RowLinear` (the stream plan's) and torchao's rowwise `Float8Tensor`
    (the fp8 plans'; its `qdata` and `scale`, shared, not copied).
    """
    weight = getattr(linear, "weight", None)
    if isinstance(linear, Fp8RowLinear):
        return linear.weight, linear.weight_scale
    values, scales = getattr(weight, "qdata", None), getattr(weight, "scale", None)
    if values is None or scales is None or values.dtype != FP8 or values.dim() != 2:
        return None
    if tuple(scales.shape) != (values.shape[0], 1):  # per-tensor or block scales: not rows
        return None
    return values, scales


class Fp8Activations(NamedTuple):
    """Activations already quantized per row: `values` (..., K) fp8, `scales` (..., 1) fp32, and the
    dtype they stand for (what a layer fed with them returns)."""

    values: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype

    def dequantize(self) -> torch.Tensor:
        """`values * scales` in `dtype` (a layer that cannot take fp8 rows gets this)."""
        return (self.values.float() * self.scales).to(self.dtype)


def project(linear: nn.Module, x: torch.Tensor | Fp8Activations) -> torch.Tensor:
    """`linear(x)`; for `Fp8Activations` and a weight stored as fp8 rows (`fp8_rows`), one fp8 GEMM of the
    given rows (no second quantization), else `linear` on the dequantized rows.

    Example:
        >>> layer = torch.nn.Linear(64, 32)
        >>> values, scales = quantize_rows(torch.randn(4, 64))
        >>> tuple(project(layer, Fp8Activations(values, scales, torch.float32)).shape)
        (4, 32)
    """
    if not isinstance(x, Fp8Activations):
        return linear(x)
    rows = fp8_rows(linear)
    if rows is None:
        return linear(x.dequantize())
    width = x.values.shape[-1]
    lead = x.values.shape[:-1]
    y = scaled_mm_rows(x.values.reshape(-1, width), x.scales.reshape(-1, 1), *rows, linear.bias, x.dtype)
    return y.reshape(*lead, rows[0].shape[0])
