"""Triton kernels of `qie.memory.fp8_mlp` (imported only where Triton is installed).

`qie_gelu_quantize_rows_tiled` is the op's kernel where the width is 1 to 4 power-of-two tiles (the
MLP's 12288 = 3 x 4096), `qie_gelu_quantize_rows` (the row padded to a power of two) elsewhere; their
names show in profiles (the bench's "quantize" category). Both launch with a fixed warp count
(`ROW_WARPS`, `TILED_WARPS`), measured at 12288 columns on an H200 (h200-ap, 8192 rows: 0.144 ms tiled
at 16 warps, 0.180 ms padded at 8; 0.276 ms padded at 4 warps). They were autotuned before, and
Inductor tunes a user kernel's configurations once, at its first call, whatever its row count: in
h200-an the 1024² forward ran the padded kernel at 0.28 ms per call (17.1 ms per forward against
~10.5 ms in the runs before it). A chunked form (a pass for the row's maximum, a second recomputing
GELU from L2, few registers per program) wrote the same bytes but took 0.237 ms at 8422 x 12288 on
an H200 against 0.200 ms for the padded kernel (runs h200-x and h200-q; Inductor's kernel 0.384 and
0.390 ms in the same runs), so it was not kept.
Float constants are constexprs: Inductor types float arguments of user kernels as fp64, which the
fp8 cast cannot lower.
"""

import triton
import triton.language as tl


@triton.jit
def gelu_bf16(x, DTYPE: tl.constexpr, IEEE: tl.constexpr):
    """GELU (tanh form) of fp32 `x`, rounded to DTYPE and back to fp32."""
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2/pi) * (x + 0.044715 x^3)
    # 0.5 x (1 + tanh(z)) = x / (1 + exp(-2z)); approximate division suffices (rounded to bf16 next)
    denominator = 1.0 + tl.exp(-2.0 * inner)
    g = tl.div_rn(x, denominator) if IEEE else tl.fdiv(x, denominator)
    return g.to(DTYPE).to(tl.float32)  # GELU's output dtype, as the unfused path


ROW_WARPS = 8
TILED_WARPS = 16


# One whole row per program, held in registers.
@triton.jit
def qie_gelu_quantize_rows(
    x_ptr, q_ptr, s_ptr, n_cols, stride_x, stride_q,
    FP8_MAX_: tl.constexpr, MIN_SCALE_: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    g = gelu_bf16(x, x_ptr.dtype.element_ty, IEEE)
    scale = tl.maximum(tl.max(tl.abs(g), axis=0) / FP8_MAX_, MIN_SCALE_)
    q = g / scale if IEEE else g * (1.0 / scale)  # one division per row
    q = tl.minimum(tl.maximum(q, -FP8_MAX_), FP8_MAX_)
    tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _gelu_chunk(x_ptr, offs, DTYPE: tl.constexpr):
    return gelu_bf16(tl.load(x_ptr + offs).to(tl.float32), DTYPE, False)


@triton.jit
def _store_chunk(q_ptr, offs, g, inverse, FP8_MAX_: tl.constexpr):
    q = tl.minimum(tl.maximum(g * inverse, -FP8_MAX_), FP8_MAX_)
    tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty))


# The same pass for rows of exactly CHUNKS x CHUNK columns (CHUNK a power of two, CHUNKS 1 to 4), e.g.
# the MLP's 12288 = 3 x 4096: the row is held as CHUNKS register tiles with no masked lanes (the
# whole-row kernel pads 12288 to a 16384-wide tile, a quarter of its arithmetic on masked lanes).
# Same values and scales as the padded kernel (GPU test); 0.144 against 0.180 ms at 8192 x 12288.
@triton.jit
def qie_gelu_quantize_rows_tiled(
    x_ptr, q_ptr, s_ptr, stride_x, stride_q,
    FP8_MAX_: tl.constexpr, MIN_SCALE_: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CHUNK)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    g0 = _gelu_chunk(x_row, offs, x_ptr.dtype.element_ty)
    largest = tl.abs(g0)
    if CHUNKS > 1:
        g1 = _gelu_chunk(x_row, offs + CHUNK, x_ptr.dtype.element_ty)
        largest = tl.maximum(largest, tl.abs(g1))
    if CHUNKS > 2:
        g2 = _gelu_chunk(x_row, offs + 2 * CHUNK, x_ptr.dtype.element_ty)
        largest = tl.maximum(largest, tl.abs(g2))
    if CHUNKS > 3:
        g3 = _gelu_chunk(x_row, offs + 3 * CHUNK, x_ptr.dtype.element_ty)
        largest = tl.maximum(largest, tl.abs(g3))
    scale = tl.maximum(tl.max(largest, axis=0) / FP8_MAX_, MIN_SCALE_)
    inverse = 1.0 / scale  # one division per row
    _store_chunk(q_row, offs, g0, inverse, FP8_MAX_)
    if CHUNKS > 1:
        _store_chunk(q_row, offs + CHUNK, g1, inverse, FP8_MAX_)
    if CHUNKS > 2:
        _store_chunk(q_row, offs + 2 * CHUNK, g2, inverse, FP8_MAX_)
    if CHUNKS > 3:
        _store_chunk(q_row, offs + 3 * CHUNK, g3, inverse, FP8_MAX_)
    tl.store(s_ptr + row, scale)
