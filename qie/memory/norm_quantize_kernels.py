"""Triton kernel of `qie.memory.norm_quantize` (imported only where Triton is installed).

`qie_norm_modulate_quantize` runs on a grid of (samples, token tiles of `ROWS` rows); each program
reads a sample's modulation once and then, row by row, holds a row in registers (the width padded
to a power of two, `BLOCK`) and reads it once: the gated residual sum `x + gate * y` written out
(`RESIDUAL`), LayerNorm without affine (`NORM`), the block's modulation `x * (1 + scale) + shift`
(`MODULATE`), the row's largest magnitude and the fp8 cast. With none of the three it is a plain row
quantization (each stream's attention output before its output projection). `PER_TOKEN`: the
modulation and gate differ per token (Edit-2511's modulation index) and are read per row. The
kernel's name shows in profiles (the bench's "quantize" category).

Roundings follow the eager module chain: the gated product and the sum, LayerNorm's output,
`1 + scale`, the product and the sum are each rounded to the activation dtype, as diffusers' bf16
ops round them; the mean and variance are float32 sums over the row in another order than
PyTorch's, and the values are multiplied by the row's inverse scale instead of divided by it (each
a last-bit difference in rare values).
Float constants are constexprs: Inductor types float arguments of user kernels as fp64.
"""

import triton
import triton.language as tl

# Launch defaults, measured by the bench's "prologue" section at 1024²'s 8192 image rows (h200-bg).
ROWS = 4
ROW_WARPS = 8


@triton.jit
def _rounded(x, DTYPE: tl.constexpr):
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def qie_norm_modulate_quantize(
    x_ptr, gate_ptr, y_ptr, shift_ptr, scale_ptr, h_ptr, q_ptr, s_ptr, n_cols, tokens,
    stride_xb, stride_xt, stride_yb, stride_yt, stride_mb, stride_mt,
    EPS: tl.constexpr, RESIDUAL: tl.constexpr, NORM: tl.constexpr, MODULATE: tl.constexpr,
    PER_TOKEN: tl.constexpr, FP8_MAX_: tl.constexpr, MIN_SCALE_: tl.constexpr, BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):  # fmt: skip
    sample = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1).to(tl.int64) * ROWS
    offs = tl.arange(0, BLOCK)
    cols = offs < n_cols
    dtype = x_ptr.dtype.element_ty
    mod = sample * stride_mb + offs
    if MODULATE and not PER_TOKEN:  # one sample's modulation, read once for all its rows
        shift = tl.load(shift_ptr + mod, mask=cols, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + mod, mask=cols, other=0.0).to(tl.float32)
    if RESIDUAL and not PER_TOKEN:
        gate = tl.load(gate_ptr + mod, mask=cols, other=0.0).to(tl.float32)
    for i in tl.static_range(ROWS):
        token = first + i
        mask = cols & (token < tokens)
        row = sample * tokens + token
        x = tl.load(x_ptr + sample * stride_xb + token * stride_xt + offs, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL:
            if PER_TOKEN:
                gate = tl.load(gate_ptr + mod + token * stride_mt, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + sample * stride_yb + token * stride_yt + offs, mask=mask, other=0.0).to(tl.float32)
            x = _rounded(x + _rounded(gate * y, dtype), dtype)
            tl.store(h_ptr + row * n_cols + offs, x.to(dtype), mask=mask)
        if NORM:
            mean = tl.sum(x, axis=0) / n_cols
            centred = tl.where(cols, x - mean, 0.0)
            variance = tl.sum(centred * centred, axis=0) / n_cols
            x = _rounded(centred * tl.rsqrt(variance + EPS), dtype)
        if MODULATE:
            if PER_TOKEN:
                shift = tl.load(shift_ptr + mod + token * stride_mt, mask=mask, other=0.0).to(tl.float32)
                scale = tl.load(scale_ptr + mod + token * stride_mt, mask=mask, other=0.0).to(tl.float32)
            x = _rounded(_rounded(x * _rounded(1.0 + scale, dtype), dtype) + shift, dtype)
        x = tl.where(cols, x, 0.0)
        row_scale = tl.maximum(tl.max(tl.abs(x), axis=0) / FP8_MAX_, MIN_SCALE_)
        q = tl.minimum(tl.maximum(x * (1.0 / row_scale), -FP8_MAX_), FP8_MAX_)  # one division per row
        tl.store(q_ptr + row * n_cols + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row, row_scale, mask=token < tokens)
