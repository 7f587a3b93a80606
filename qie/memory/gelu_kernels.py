"""Triton kernels of `qie.memory.fp8_mlp` (imported only where Triton is installed).

`qie_gelu_quantize_rows` is the op's kernel; its name shows in profiles (the bench's "quantize"
category). A chunked form (a pass for the row's maximum, a second recomputing GELU from L2, few
registers per program) wrote the same bytes but took 0.237 ms at 8422 x 12288 on an H200 against
0.200 ms for this one (runs h200-x and h200-q; Inductor's kernel 0.384 and 0.390 ms in the same
runs), so it was not kept.
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


# One whole row per program, held in registers; the warp count that keeps the most rows in flight
# depends on the width and the GPU, so it is measured once per width.
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
