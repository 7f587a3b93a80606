"""A block's LayerNorm, modulation and fp8 row quantization in one pass (fp8 plans, compiled).

Each transformer block normalizes each stream (LayerNorm without affine), modulates it
(`x * (1 + scale) + shift`, from the timestep) and, with fp8 matmuls, quantizes the result per row
before the projections that read it (q/k/v, or the MLP's first layer). Compiled, that was a looped
reduction kernel per stream and norm, which read each row three times: 0.086 ms per call at 1024²
on an H200, 9.7 ms of a 0.18 s forward, five times its memory traffic (h200-au). Here one Triton
program holds a row in registers and writes its fp8 values and scale (`qie.memory.norm_quantize_kernels`).
`quantize_activations` is the same pass without norm and modulation (each stream's slice of the
attention output, read in place, before its output projection).

Both return `Fp8Activations`, which `qie.memory.fp8_matmul.project` hands to a layer's fp8 GEMM
without quantizing again. Off CUDA, or without Triton, the op is the PyTorch arithmetic below
(`norm_modulate_reference`, the tests' oracle). Tolerance ``block-prologue-fused``.

Example:
    >>> x = torch.randn(1, 6, 64, dtype=torch.bfloat16)
    >>> shift = scale = torch.zeros(1, 1, 64, dtype=torch.bfloat16)
    >>> rows = norm_modulate_quantize(x, shift, scale, 1e-6)
    >>> rows.values.dtype, tuple(rows.scales.shape)
    (torch.float8_e4m3fn, (1, 6, 1))
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.library import triton_op, wrap_triton

from qie.memory.fp8_matmul import FP8, FP8_MAX, MIN_SCALE, Fp8Activations, quantize_rows

OP = "qie::norm_modulate_quantize"


def norm_modulate_reference(
    x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor | None, eps: float | None
) -> torch.Tensor:
    """diffusers' chain in `x`'s dtype: `LayerNorm(x) * (1 + scale) + shift` (each part optional)."""
    if eps is not None:
        x = nn.functional.layer_norm(x, x.shape[-1:], eps=eps)
    if scale is not None:
        x = x * (1 + scale) + shift
    return x


@functools.cache
def _triton_kernels():
    """The `qie.memory.norm_quantize_kernels` module, or None when Triton is not installed."""
    try:
        from qie.memory import norm_quantize_kernels
    except ImportError:
        return None
    return norm_quantize_kernels


def _launch(x, shift, scale, eps, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton pass over CUDA rows `x` [B, T, D] (unit column stride); `shift` and `scale` [B, T, D]
    with any batch and token strides (0 where shared). Fresh outputs: aligned as cuBLAS needs them."""
    kernels = _triton_kernels()
    batch, tokens, width = x.shape
    rows = batch * tokens
    values = torch.empty((batch, tokens, width), dtype=FP8, device=x.device)
    scales = torch.empty((batch, tokens, 1), dtype=torch.float32, device=x.device)
    modulate = scale is not None
    wrap_triton(kernels.qie_norm_modulate_quantize)[(rows,)](
        x, shift if modulate else x, scale if modulate else x, values, scales, width, tokens, x.stride(0),
        x.stride(1), shift.stride(0) if modulate else 0, shift.stride(1) if modulate else 0,
        EPS=eps if eps is not None else 0.0, NORM=eps is not None, MODULATE=modulate, FP8_MAX_=FP8_MAX,
        MIN_SCALE_=MIN_SCALE, BLOCK=1 << (width - 1).bit_length(), num_warps=num_warps or kernels.ROW_WARPS,
    )  # fmt: skip
    return values, scales


@triton_op(OP, mutates_args=())
def _norm_quantize_op(
    x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor | None, eps: float, norm: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    # A Triton op: compiled graphs launch the kernel from Inductor's generated code (no call back into
    # Python per block); the body stays traceable (torch ops and `wrap_triton` launches only).
    eps_or_none = eps if norm else None
    if x.is_cuda and x.stride(-1) == 1 and _triton_kernels() is not None:
        return _launch(x, shift, scale, eps_or_none)
    values, scales = quantize_rows(norm_modulate_reference(x, shift, scale, eps_or_none).flatten(0, 1))
    return values.view(x.shape).contiguous(), scales.view(*x.shape[:2], 1).contiguous()


def _rows_of(x: torch.Tensor) -> torch.Tensor:
    """`x` as [B, T, D] with unit column stride (a copy only where needed; token slices are not copied)."""
    x = x.reshape(-1, *x.shape[-2:]) if x.dim() != 3 else x
    return x if x.stride(-1) == 1 else x.contiguous()


def norm_modulate_quantize(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> Fp8Activations:
    """`LayerNorm(x) * (1 + scale) + shift` quantized per row, in one pass on CUDA.

    `x` [B, T, D]; `shift`, `scale` broadcast against it ([B, 1, D] per sample, [B, T, D] per token as
    Edit-2511's modulation index gives). One Triton op (`qie::norm_modulate_quantize`).
    """
    x = _rows_of(x)
    shift, scale = shift.expand_as(x), scale.expand_as(x)
    if shift.stride() != scale.stride() or shift.stride(-1) != 1:
        shift, scale = shift.contiguous(), scale.contiguous()
    values, scales = _norm_quantize_op(x, shift, scale, eps, True)
    return Fp8Activations(values, scales, x.dtype)


def quantize_activations(x: torch.Tensor) -> Fp8Activations:
    """`x` [B, T, D] (a token slice reads in place) quantized per row (`quantize_rows`'s values and scales),
    one pass on CUDA, into fresh tensors (a slice of the scales could sit off cuBLAS's 16-byte alignment)."""
    x = _rows_of(x)
    values, scales = _norm_quantize_op(x, None, None, 0.0, False)
    return Fp8Activations(values, scales, x.dtype)
