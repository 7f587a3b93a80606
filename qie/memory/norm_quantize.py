"""A block's LayerNorm, modulation and fp8 row quantization in one pass (fp8 plans, compiled).

Each transformer block normalizes each stream (LayerNorm without affine), modulates it
(`x * (1 + scale) + shift`, from the timestep) and, with fp8 matmuls, quantizes the result per row
before the projections that read it (q/k/v, or the MLP's first layer). Compiled, that was a looped
reduction kernel per stream and norm, which read each row three times: 0.086 ms per call at 1024²
on an H200, 9.7 ms of a 0.18 s forward, five times its memory traffic (h200-au). Here one Triton
program holds a row in registers and writes its fp8 values and scale (`qie.memory.norm_quantize_kernels`;
0.035 ms at 8192 rows, h200-bh). `add_norm_modulate_quantize` first forms and writes the gated
residual sum `x + gate * y` it then normalizes (the block's sum after attention: 0.051 ms), and
`quantize_activations` is the pass without norm and modulation (each stream's slice of the attention
output, read in place, before its output projection).

They return `Fp8Activations`, which `qie.memory.fp8_matmul.project` hands to a layer's fp8 GEMM
without quantizing again. Off CUDA, or without Triton, the ops are the eager PyTorch arithmetic below
(`norm_modulate_reference`, the tests' oracle); the kernel computes in float32 and rounds once.
Tolerance ``block-prologue-fused``.

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
ADD_OP = "qie::add_norm_modulate_quantize"


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


def _launch(
    x, shift, scale, eps, gate=None, y=None, rows: int | None = None, num_warps: int | None = None
) -> tuple[torch.Tensor, ...]:
    """The Triton pass over CUDA rows `x` [B, T, D] (unit column stride): (values, scales), and first the
    gated sum `x + gate * y` when `gate` is given. `shift`, `scale` and `gate` [B, T, D] with one set of
    batch and token strides (token stride 0: per sample). Fresh outputs: aligned as cuBLAS needs them.
    `rows` (rows per program) and `num_warps`: instead of the measured defaults (the bench's sweep)."""
    kernels = _triton_kernels()
    batch, tokens, width = x.shape
    values = torch.empty((batch, tokens, width), dtype=FP8, device=x.device)
    scales = torch.empty((batch, tokens, 1), dtype=torch.float32, device=x.device)
    summed = torch.empty_like(x, memory_format=torch.contiguous_format) if gate is not None else values
    modulate, residual = scale is not None, gate is not None
    mod = shift if modulate else gate if residual else x
    rows = rows or kernels.ROWS
    grid = (batch, (tokens + rows - 1) // rows)
    wrap_triton(kernels.qie_norm_modulate_quantize)[grid](
        x, gate if residual else x, y if residual else x, shift if modulate else x, scale if modulate else x,
        summed, values, scales, width, tokens, x.stride(0), x.stride(1),
        y.stride(0) if residual else 0, y.stride(1) if residual else 0, mod.stride(0), mod.stride(1),
        EPS=eps if eps is not None else 0.0, RESIDUAL=residual, NORM=eps is not None, MODULATE=modulate,
        PER_TOKEN=(modulate or residual) and mod.stride(1) != 0 and tokens > 1, FP8_MAX_=FP8_MAX,
        MIN_SCALE_=MIN_SCALE, BLOCK=1 << (width - 1).bit_length(), ROWS=rows,
        num_warps=num_warps or kernels.ROW_WARPS,
    )  # fmt: skip
    return (summed, values, scales) if residual else (values, scales)


def _reference(x, shift, scale, eps) -> tuple[torch.Tensor, torch.Tensor]:
    values, scales = quantize_rows(norm_modulate_reference(x, shift, scale, eps).flatten(0, 1))
    return values.view(x.shape).contiguous(), scales.view(*x.shape[:2], 1).contiguous()


def _on_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and x.stride(-1) == 1 and _triton_kernels() is not None


@triton_op(OP, mutates_args=())
def _norm_quantize_op(
    x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor | None, eps: float, norm: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    # A Triton op: compiled graphs launch the kernel from Inductor's generated code (no call back into
    # Python per block); the body stays traceable (torch ops and `wrap_triton` launches only).
    eps_or_none = eps if norm else None
    if _on_triton(x):
        return _launch(x, shift, scale, eps_or_none)
    return _reference(x, shift, scale, eps_or_none)


@triton_op(ADD_OP, mutates_args=())
def _add_norm_quantize_op(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _on_triton(x) and y.stride(-1) == 1:
        return _launch(x, shift, scale, eps, gate, y)
    summed = x + gate * y
    return (summed.contiguous(), *_reference(summed, shift, scale, eps))


def _rows_of(x: torch.Tensor) -> torch.Tensor:
    """`x` as [B, T, D] with unit column stride (a copy only where needed; token slices are not copied)."""
    x = x.reshape(-1, *x.shape[-2:]) if x.dim() != 3 else x
    return x if x.stride(-1) == 1 else x.contiguous()


def _modulation_rows(x: torch.Tensor, *params: torch.Tensor) -> list[torch.Tensor]:
    """`params` broadcast to `x`'s [B, T, D] with one set of strides and unit column stride."""
    params = [p.expand_as(x) for p in params]
    if len({p.stride() for p in params}) > 1 or params[0].stride(-1) != 1:
        params = [p.contiguous() for p in params]
    return params


def norm_modulate_quantize(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> Fp8Activations:
    """`LayerNorm(x) * (1 + scale) + shift` quantized per row, in one pass on CUDA.

    `x` [B, T, D]; `shift`, `scale` broadcast against it ([B, 1, D] per sample, [B, T, D] per token as
    Edit-2511's modulation index gives). One Triton op (`qie::norm_modulate_quantize`).
    """
    x = _rows_of(x)
    shift, scale = _modulation_rows(x, shift, scale)
    values, scales = _norm_quantize_op(x, shift, scale, eps, True)
    return Fp8Activations(values, scales, x.dtype)


def add_norm_modulate_quantize(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, Fp8Activations]:
    """(`h = x + gate * y`, `norm_modulate_quantize(h, shift, scale, eps)`) in one pass on CUDA: a block's
    gated residual sum after attention and the rows of its MLP. `gate` broadcasts as `shift` does."""
    x, y = _rows_of(x), _rows_of(y)
    gate, shift, scale = _modulation_rows(x, gate, shift, scale)
    summed, values, scales = _add_norm_quantize_op(x, gate, y, shift, scale, eps)
    return summed, Fp8Activations(values, scales, x.dtype)


def quantize_activations(x: torch.Tensor) -> Fp8Activations:
    """`x` [B, T, D] (a token slice reads in place) quantized per row (`quantize_rows`'s values and scales),
    one pass on CUDA, into fresh tensors (a slice of the scales could sit off cuBLAS's 16-byte alignment)."""
    x = _rows_of(x)
    values, scales = _norm_quantize_op(x, None, None, 0.0, False)
    return Fp8Activations(values, scales, x.dtype)
