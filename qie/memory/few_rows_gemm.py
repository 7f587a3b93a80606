"""fp8 products of few rows in Triton: the text stream's projections and the blocks' modulation.

A 1024² edit's joint blocks multiply 8192 image rows and ~230 text rows by their own fp8 weights, and
`temb` (one row per sample) by two modulation layers each. cuBLAS runs the text stream's GEMMs with
128 x 128 tiles: at 234 rows that is 2 x 24 tiles for a 3072-wide weight, a third of an H200's 132
SMs, each reading its weight slice alone; and each modulation layer as its own tile GEMM after a
kernel that quantizes `silu(temb)` (measured on an H200: 25.5 us a layer against an 11.8 us weight
read, h200-ce).

- `fp8_rows_gemm`: `(xq * xs) @ (values * scales).T + bias` in 64 x 128 tiles where that beats cuBLAS
  (`tile_for`), with the arithmetic of `torch._scaled_mm(use_fast_accum=True)` for rowwise scales
  (Hopper's fp8 tensor-core sums, both scales and the bias applied once, one rounding).
  `qie.memory.fp8_matmul.scaled_mm_rows` routes the products it `serves`.
- `silu_linears`: a block's image and text modulation, `linear(silu(temb))` for both layers in one
  launch, reading each fp8 weight once; SiLU's bf16 values multiply the weights as they are (no fp8
  quantization of `temb`: closer to bf16 weights than the torchao path it replaces). The block
  prologue (`qie.speed.block_prologue.modulations`) hands it the layers' fp8 rows.

Example:
    >>> tile_for(234, 3072, 3072) is not None, tile_for(8192, 3072, 3072)
    (True, None)
"""

from __future__ import annotations

import functools
import importlib.util
from typing import NamedTuple

import torch
from torch import nn
from torch.library import triton_op, wrap_triton

OP = "qie::fp8_rows_gemm"
SILU_LINEARS_OP = "qie::silu_linears"
TRITON = importlib.util.find_spec("triton") is not None


class Tile(NamedTuple):
    """A launch shape: rows and columns of output per program, the reduction's slice per step and its
    pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    stages: int


# Measured from CUDA graphs on an H200 (h200-ce, `fast_levers --sections small-gemm`), microseconds
# against cuBLAS: 234 x 3072 @ 3072 (the text stream's q/k/v and output projections) 9.2 against 10.9,
# 234 x 12288 @ 3072 (its MLP's output layer) 27.4 against 32.2. cuBLAS stays faster for the MLP's
# 12288-wide first layer (19.4 against 25.3) and at 468 rows (batched CFG's two prompts: 11.3 against
# 13.8, 34.0 against 46.1).
TILE = Tile(64, 128, 128, 5)
FEW_ROWS = 256  # more rows: cuBLAS
NARROW = 3072  # wider outputs: cuBLAS (measured up to 3072 columns)


def tile_for(m: int, k: int, n: int) -> Tile | None:
    """The launch shape for an (m x k) @ (k x n) product where the Triton kernel beats cuBLAS (at most
    `FEW_ROWS` rows and `NARROW` columns, measured), or None (also where the shape does not divide
    into the tiles).

    Example:
        >>> tile_for(234, 12288, 3072), tile_for(234, 3072, 12288)
        (Tile(block_m=64, block_n=128, block_k=128, stages=5), None)
    """
    if not 1 <= m <= FEW_ROWS or n > NARROW or n % TILE.block_n or k % TILE.block_k:
        return None
    return TILE


@functools.cache
def _triton_kernels():
    """The `qie.memory.few_rows_gemm_kernels` module, or None when Triton is not installed."""
    try:
        from qie.memory import few_rows_gemm_kernels
    except ImportError:
        return None
    return few_rows_gemm_kernels


def serves(xq: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether `fp8_rows_gemm` takes this product: CUDA, Triton, fp8 rows read along K, a measured tile."""
    return (
        TRITON
        and xq.is_cuda
        and xq.dtype == torch.float8_e4m3fn
        and values.dtype == torch.float8_e4m3fn
        and xq.dim() == 2
        and xq.stride(1) == 1
        and values.stride(1) == 1
        and tile_for(xq.shape[0], xq.shape[1], values.shape[0]) is not None
    )


def _launch(xq, xs, values, scales, bias, out_dtype: torch.dtype, tile: Tile) -> torch.Tensor:
    kernels = _triton_kernels()
    m, k = xq.shape
    n = values.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    grid = (n // tile.block_n, (m + tile.block_m - 1) // tile.block_m)
    wrap_triton(kernels.qie_fp8_rows_gemm)[grid](
        xq, xs, values, scales, values if bias is None else bias, y, m, k, xq.stride(0), xs.stride(0),
        values.stride(0), scales.stride(0), y.stride(0), HAS_BIAS=bias is not None, BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, STAGES=tile.stages, num_warps=4,
    )  # fmt: skip
    return y


@triton_op(OP, mutates_args=())
def fp8_rows_gemm(
    xq: torch.Tensor,
    xs: torch.Tensor,
    values: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """`(xq * xs) @ (values * scales).T + bias` (`xq` M x K fp8 with `xs` M x 1, `values` N x K fp8 with
    `scales` N x 1), rounded once to `out_dtype`: the Triton kernel where `serves` says so, else
    `emulate` (`qie.memory.fp8_matmul.scaled_mm_rows` routes only what this serves).

    A Triton op: compiled blocks launch the kernel from Inductor's generated code (no call back into
    Python per projection); the body stays traceable.
    """
    bias = None if bias is None else bias.to(out_dtype)
    if not (serves(xq, values) and _triton_kernels() is not None):  # callers route through `scaled_mm_rows`
        return emulate(xq, xs, values, scales, bias, out_dtype)
    return _launch(xq, xs, values, scales, bias, out_dtype, tile_for(xq.shape[0], xq.shape[1], values.shape[0]))


GEMV_N, GEMV_K = 16, 256  # outputs per program, reduction slice per step (h200-ce: 17.7-20.3 us a layer)
Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # a layer's fp8 values (N x K), scales (N x 1), bias (N)


@triton_op(SILU_LINEARS_OP, mutates_args=())
def _silu_linears_op(
    temb: torch.Tensor,
    a_values: torch.Tensor,
    a_scales: torch.Tensor,
    a_bias: torch.Tensor,
    b_values: torch.Tensor,
    b_scales: torch.Tensor,
    b_bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    # A Triton op (see `fp8_rows_gemm`); off CUDA, the same arithmetic in PyTorch
    if not (temb.is_cuda and _triton_kernels() is not None):
        silu = nn.functional.silu(temb).float()
        return tuple(
            ((silu @ values.float().t()) * scales.t() + bias.float()).to(temb.dtype)
            for values, scales, bias in ((a_values, a_scales, a_bias), (b_values, b_scales, b_bias))
        )
    kernels = _triton_kernels()
    rows, k = temb.shape
    a_y = temb.new_empty(rows, a_values.shape[0])
    b_y = temb.new_empty(rows, b_values.shape[0])
    a_tiles = a_values.shape[0] // GEMV_N
    wrap_triton(kernels.qie_silu_modulations)[(a_tiles + b_values.shape[0] // GEMV_N,)](
        temb, a_values, a_scales, a_bias, a_y, a_tiles, b_values, b_scales, b_bias, b_y, k, temb.stride(0),
        a_values.stride(0), a_scales.stride(0), a_y.stride(0), b_values.stride(0), b_scales.stride(0),
        b_y.stride(0), ROWS=rows, BLOCK_N=GEMV_N, BLOCK_K=GEMV_K, STAGES=3, num_warps=4,
    )  # fmt: skip
    return a_y, b_y


def silu_linears(temb: torch.Tensor, a: Rows, b: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """`linear(silu(temb))` for two fp8-row layers `a` and `b` (a block's image and text modulation), one
    launch on CUDA (see `silu_linears_fusable`): SiLU in `temb`'s dtype, its values times the fp8 weights
    summed in float32, times the row scales, plus the biases, one rounding.

    Example:
        >>> values, scales = torch.ones(16, 8, dtype=torch.float8_e4m3fn), torch.full((16, 1), 0.5)
        >>> a, b = (values, scales, torch.ones(16)), (values, scales, torch.zeros(16))
        >>> img, txt = silu_linears(torch.zeros(1, 8), a, b)
        >>> img[0, 0].item(), txt[0, 0].item()
        (1.0, 0.0)
    """
    return _silu_linears_op(temb, *a, *b)


def silu_linears_fusable(temb: torch.Tensor, *layers: Rows) -> bool:
    """Whether `silu_linears` runs its kernel: CUDA, Triton, 1 or 2 rows of a bf16/fp16 `temb` read along
    its width, weights read along K in whole tiles, biases in `temb`'s dtype."""
    if not (TRITON and temb.is_cuda and temb.dim() == 2 and temb.shape[0] in (1, 2) and temb.stride(1) == 1):
        return False
    if temb.dtype not in (torch.bfloat16, torch.float16) or temb.shape[1] % GEMV_K:
        return False
    return all(
        values.shape[1] == temb.shape[1]
        and values.stride(1) == 1
        and values.shape[0] % GEMV_N == 0
        and bias.dtype == temb.dtype
        for values, _, bias in layers
    )


def emulate(xq, xs, values, scales, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """`fp8_rows_gemm`'s product in float32 on any device (the CPU path of `scaled_mm_rows`); `bias`
    already in `out_dtype` (both callers cast it)."""
    y = ((xq.float() @ values.float().t()) * xs * scales.t()).to(out_dtype)
    return y if bias is None else y + bias
