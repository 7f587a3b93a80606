"""Triton kernels of `qie.memory.fp8_mlp` (imported only where Triton is installed).

`qie_gelu_quantize_rows_chunked` is the op's; `qie_gelu_quantize_rows` (one whole row per program)
is the previous kernel, kept for the benchmark's same-run comparison. Their names show in profiles.
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


# One row per program in chunks of CHUNK columns: a first pass takes the row's maximum, a second
# recomputes GELU (the row is still in L2) and stores fp8. Few registers per program, so many
# rows are in flight per SM. Chunk and warp count are measured once per width.
@triton.autotune(
    configs=[triton.Config({"CHUNK": c}, num_warps=w) for c in (1024, 2048, 4096) for w in (4, 8)],
    key=["n_cols"],
)
@triton.jit
def qie_gelu_quantize_rows_chunked(
    x_ptr, q_ptr, s_ptr, n_cols, stride_x, stride_q,
    FP8_MAX_: tl.constexpr, MIN_SCALE_: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row, q_row = x_ptr + row * stride_x, q_ptr + row * stride_q
    offs = tl.arange(0, CHUNK)
    largest = tl.zeros([CHUNK], dtype=tl.float32)
    for start in tl.range(0, n_cols, CHUNK):
        mask = start + offs < n_cols
        x = tl.load(x_row + start + offs, mask=mask, other=0.0, eviction_policy="evict_last")
        largest = tl.maximum(largest, tl.abs(gelu_bf16(x.to(tl.float32), x_ptr.dtype.element_ty, False)))
    scale = tl.maximum(tl.max(largest, axis=0) / FP8_MAX_, MIN_SCALE_)
    inverse = 1.0 / scale  # one division per row
    for start in tl.range(0, n_cols, CHUNK):
        mask = start + offs < n_cols
        x = tl.load(x_row + start + offs, mask=mask, other=0.0, eviction_policy="evict_first")
        q = gelu_bf16(x.to(tl.float32), x_ptr.dtype.element_ty, False) * inverse
        q = tl.minimum(tl.maximum(q, -FP8_MAX_), FP8_MAX_)
        tl.store(q_row + start + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


# The previous kernel (for benchmarks): one whole row per program, held in registers.
@triton.autotune(configs=[triton.Config({}, num_warps=w) for w in (4, 8, 16, 32)], key=["n_cols"])
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
