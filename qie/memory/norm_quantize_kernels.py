"""Triton kernel of `qie.memory.norm_quantize` (imported only where Triton is installed).

`qie_norm_modulate_quantize` holds one row per program in registers (the width padded to a power
of two, `BLOCK`) and reads it once: LayerNorm without affine (`NORM`), the block's modulation
`x * (1 + scale) + shift` (`MODULATE`), the row's largest magnitude and the fp8 cast. Without
`NORM` and `MODULATE` it is a plain row quantization (the attention output before its projections).
The kernel's name shows in profiles (the bench's "quantize" category).

Roundings follow the eager module chain: LayerNorm's output, `1 + scale`, the product and the sum
are each rounded to the activation dtype, as diffusers' bf16 ops round them; the mean and variance
are float32 sums over the row in another order than PyTorch's, and the values are multiplied by the
row's inverse scale instead of divided by it (each a last-bit difference in rare values).
Float constants are constexprs: Inductor types float arguments of user kernels as fp64.
"""

import triton
import triton.language as tl

ROW_WARPS = 4  # launch default; the bench's "prologue" section measures 2, 4, 8 and 16


@triton.jit
def _rounded(x, DTYPE: tl.constexpr):
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def qie_norm_modulate_quantize(
    x_ptr, shift_ptr, scale_ptr, q_ptr, s_ptr, n_cols, tokens, stride_xb, stride_xt, stride_mb, stride_mt,
    EPS: tl.constexpr, NORM: tl.constexpr, MODULATE: tl.constexpr,
    FP8_MAX_: tl.constexpr, MIN_SCALE_: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    sample, token = row // tokens, row % tokens
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + sample * stride_xb + token * stride_xt + offs, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        mean = tl.sum(x, axis=0) / n_cols
        centred = tl.where(mask, x - mean, 0.0)
        variance = tl.sum(centred * centred, axis=0) / n_cols
        x = _rounded(centred * tl.rsqrt(variance + EPS), dtype)
    if MODULATE:
        mod = sample * stride_mb + token * stride_mt + offs
        shift = tl.load(shift_ptr + mod, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + mod, mask=mask, other=0.0).to(tl.float32)
        x = _rounded(_rounded(x * _rounded(1.0 + scale, dtype), dtype) + shift, dtype)
    x = tl.where(mask, x, 0.0)
    row_scale = tl.maximum(tl.max(tl.abs(x), axis=0) / FP8_MAX_, MIN_SCALE_)
    q = tl.minimum(tl.maximum(x * (1.0 / row_scale), -FP8_MAX_), FP8_MAX_)  # one division per row
    tl.store(q_ptr + row * n_cols + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, row_scale)
