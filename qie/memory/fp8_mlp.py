"""The transformer MLP's GELU and the fp8 quantization of its output in one pass (fp8 plans).

Each block's MLP is `fc2(gelu_tanh(fc1(x)))` with a 12288-wide hidden layer. With fp8 matmuls the
hidden activations are quantized per row before `fc2` (one fp32 scale per token, as torchao's
float8 rowwise does). Left to `torch.compile`, GELU, the row maximum and the fp8 cast became one
looped reduction kernel that read the 12288-wide rows twice and recomputed GELU: 20.5 ms of a
0.217 s forward on an H200, against ~3.8 ms of memory traffic. `gelu_quantize_rows` does it in
one pass (`qie.memory.gelu_kernels`), one row per Triton program held in registers, with fast
(approximate) division per element and one exact division per row (8422 × 12288 rows on an H200:
0.200 ms, 0.546 ms with IEEE divisions in the same run; ~0.07 ms of memory traffic), and
`Fp8GeluFeedForward` feeds its fp8 rows and scales straight to `fc2`'s fp8 GEMM. At the MLP's
width (12288 = 3 x 4096) the kernel holds each row as three 4096-wide tiles (no padded lanes):
0.144 ms at 8192 rows (h200-ap).

The arithmetic is the unfused path's: GELU (tanh form) rounded to the activation dtype, then
`qie.memory.fp8_matmul.quantize_rows`. Off CUDA, or without Triton, the op runs exactly that in
PyTorch (the tests' reference).

Example:
    >>> h = torch.randn(4, 64, dtype=torch.bfloat16)
    >>> values, scales = gelu_quantize_rows(h)
    >>> values.dtype, tuple(scales.shape)
    (torch.float8_e4m3fn, (4, 1))
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.library import triton_op, wrap_triton

from qie.memory.fp8_matmul import (
    FP8,
    FP8_MAX,
    MIN_SCALE,
    Fp8Activations,
    Fp8RowLinear,
    fp8_rows,
    project,
    quantize_rows,
    scaled_mm_rows,
)

log = logging.getLogger(__name__)

OP = "qie::gelu_quantize_rows"


def gelu_quantize_reference(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU (tanh form) in `h`'s dtype, then fp8 rows: what the unfused MLP computes."""
    return quantize_rows(nn.functional.gelu(h, approximate="tanh"))


@functools.cache
def _triton_kernels():
    """The `qie.memory.gelu_kernels` module, or None when Triton is not installed."""
    try:
        from qie.memory import gelu_kernels
    except ImportError:
        return None
    return gelu_kernels


def row_tiles(cols: int) -> tuple[int, int] | None:
    """(tile width, tiles) when `cols` is exactly 1 to 4 tiles of a power-of-two width of at least 128, else None.

    Example:
        >>> row_tiles(12288), row_tiles(3072), row_tiles(3000)
        ((4096, 3), (1024, 3), None)
    """
    for chunks in (1, 2, 3, 4):
        chunk = cols // chunks
        if chunk * chunks == cols and chunk >= 128 and chunk & (chunk - 1) == 0:
            return chunk, chunks
    return None


def _launch(
    h: torch.Tensor, ieee: bool = False, tiled: bool = True, num_warps: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton pass on CUDA rows `h`. `tiled`: the kernel that holds a row as whole power-of-two
    tiles (`row_tiles`) where the width allows, else the one padding the row to a power of two; `ieee`:
    IEEE divisions per element (the first version, padded kernel, for benchmarks); `num_warps`: instead
    of the kernel's measured warp count (`gelu_kernels.TILED_WARPS` / `ROW_WARPS`)."""
    kernels = _triton_kernels()
    rows, cols = h.shape
    values = torch.empty((rows, cols), dtype=FP8, device=h.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=h.device)
    tiles = row_tiles(cols) if tiled and not ieee else None
    if tiles is not None:
        kernel, warps = kernels.qie_gelu_quantize_rows_tiled, kernels.TILED_WARPS
        shape = {"CHUNK": tiles[0], "CHUNKS": tiles[1]}
    else:
        kernel, warps = kernels.qie_gelu_quantize_rows, kernels.ROW_WARPS
        shape = {"n_cols": cols, "BLOCK": 1 << (cols - 1).bit_length(), "IEEE": ieee}  # next power of two
    wrap_triton(kernel)[(rows,)](
        x_ptr=h, q_ptr=values, s_ptr=scales, stride_x=h.stride(0), stride_q=values.stride(0),
        FP8_MAX_=FP8_MAX, MIN_SCALE_=MIN_SCALE, **shape, num_warps=num_warps or warps,
    )  # fmt: skip
    return values, scales


@triton_op(OP, mutates_args=())
def _gelu_quantize_op(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # A Triton op, not an opaque custom op: compiled graphs launch the kernel from Inductor's own
    # wrapper code instead of calling back into Python through the dispatcher for each of the 120
    # MLPs of a forward. The body must stay traceable (torch ops and `wrap_triton` launches only).
    if h.is_cuda and h.stride(-1) == 1 and _triton_kernels() is not None:
        return _launch(h)
    values, scales = gelu_quantize_reference(h)
    return values.contiguous(), scales.contiguous()


def gelu_quantize_rows(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`gelu_tanh(h)` (rows × K) as fp8 values and one fp32 scale per row, in one pass on CUDA.

    One Triton op (`qie::gelu_quantize_rows`): `torch.compile` launches the kernel as it is, from its
    generated code.
    """
    return _gelu_quantize_op(h)


class Fp8GeluFeedForward(nn.Module):
    """A diffusers `FeedForward` (GELU tanh) whose output layer multiplies fused-quantized fp8 rows.

    Made from the module in place by `fuse`; `fc2_values`/`fc2_scales` are the output layer's own
    fp8 rows (torchao storage), or read from it on every call (an `Fp8RowLinear`, whose weights the
    streamer may rebind).
    """

    net: nn.ModuleList
    fc2_values: torch.Tensor
    fc2_scales: torch.Tensor

    def forward(self, hidden_states: torch.Tensor | Fp8Activations, *args, **kwargs) -> torch.Tensor:
        h = project(self.net[0].proj, hidden_states)  # fp8 rows from the block's fused prologue: no requantization
        out = self.net[2]
        if isinstance(out, Fp8RowLinear):
            values, scales = out.weight, out.weight_scale
        else:
            values, scales = self.fc2_values, self.fc2_scales
        lead = h.shape[:-1]
        hq, hs = gelu_quantize_rows(h.reshape(-1, h.shape[-1]))
        y = scaled_mm_rows(hq, hs, values, scales, out.bias, h.dtype)
        return y.reshape(*lead, values.shape[0])

    @classmethod
    def fuse(cls, ff: nn.Module) -> bool:
        """Turn `ff` into an `Fp8GeluFeedForward` in place if it is GELU-tanh → dropout → fp8-row linear."""
        net = getattr(ff, "net", None)
        if net is None or len(net) != 3 or getattr(net[0], "approximate", None) != "tanh":
            return False
        if not hasattr(net[0], "proj") or not isinstance(net[1], nn.Dropout) or net[1].p != 0.0:
            return False
        rows = fp8_rows(net[2])
        if rows is None:
            return False
        if not isinstance(net[2], Fp8RowLinear):
            ff.register_buffer("fc2_values", rows[0], persistent=False)
            ff.register_buffer("fc2_scales", rows[1], persistent=False)
        if not isinstance(ff, cls):
            ff.__class__ = _fused_class(cls, type(ff))
        return True


@functools.cache
def _fused_class(fused: type, base: type) -> type:
    """One class per MLP class (compiled blocks share their graph only if their modules share classes)."""
    return type(f"Fp8Gelu{base.__name__}", (fused, base), {})


def fuse_mlp_quantization(transformer: nn.Module) -> int:
    """Fuse GELU and fp8 quantization in every block MLP of `transformer` whose output layer is fp8 rows.

    Returns how many MLPs were fused (0 when none qualifies, e.g. bf16 weights).

    Example:
        >>> fuse_mlp_quantization(pipe.transformer)  # after quantize_transformer  # doctest: +SKIP
        120
    """
    fused = 0
    for name, module in transformer.named_modules():
        if name.startswith("transformer_blocks.") and name.endswith("_mlp") and Fp8GeluFeedForward.fuse(module):
            fused += 1
    if fused:
        log.info("fp8 MLPs: GELU and the fp8 row quantization fused in %d MLPs", fused)
    return fused
