"""Triton kernel of `qie.memory.norm_quantize` (imported only where Triton is installed).

`qie_norm_modulate_quantize` runs on a grid of (samples, token tiles of `ROWS` rows); each program
reads a sample's modulation once and then, row by row, holds a row in registers (the width padded
to a power of two, `BLOCK`) and reads it once: the gated residual sum `x + gate * y` written out
(`RESIDUAL`), LayerNorm without affine (`NORM`), the block's modulation `x * (1 + scale) + shift`
(`MODULATE`), the row's largest magnitude and the fp8 cast. With none of the three it is a plain row
quantization (each stream's attention output before its output projection). `PER_TOKEN`: the
modulation and gate differ per token (Edit-2511's modulation index) and are read per row. The
kernel's name shows in profiles (the bench's "quantize" category).

The arithmetic runs in float32 and rounds once, where it stores (the sum in the activation dtype,
the fp8 values; the norm reads the float32 sum), as Inductor's fused kernels do; diffusers' eager
bf16 ops round after each op (h200-bh: the gated sums differ from eager's by one bf16 step in
12.8 % of the values, a rate a CPU emulation of the two roundings reproduces, 12.7 %). Round trips
through bf16 written into a Triton kernel do not round: its compiler folds them. The mean and
variance are float32 sums in another order than PyTorch's; the values are multiplied by the row's
inverse scale.
Float constants are constexprs: Inductor types float arguments of user kernels as fp64.
"""

import triton
import triton.language as tl

# Launch defaults, measured by the bench's "prologue-kernel" section at 8192 rows of 3072 (h200-bh): 1 row
# and 4 warps per program, 0.035 ms (norm) + 0.051 ms (sum + norm) a call; 2 rows 0.035 + 0.053, 4 rows
# 0.036 + 0.061; 8 and 16 warps slower at every row count. Floors 0.016 and 0.037 ms.
ROWS = 1
ROW_WARPS = 4


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
            x = x + gate * y
            tl.store(h_ptr + row * n_cols + offs, x.to(dtype), mask=mask)
        if NORM:
            mean = tl.sum(x, axis=0) / n_cols
            centred = tl.where(cols, x - mean, 0.0)
            variance = tl.sum(centred * centred, axis=0) / n_cols
            x = centred * tl.rsqrt(variance + EPS)
        if MODULATE:
            if PER_TOKEN:
                shift = tl.load(shift_ptr + mod + token * stride_mt, mask=mask, other=0.0).to(tl.float32)
                scale = tl.load(scale_ptr + mod + token * stride_mt, mask=mask, other=0.0).to(tl.float32)
            x = x * (1.0 + scale) + shift
        x = tl.where(cols, x, 0.0)
        row_scale = tl.maximum(tl.max(tl.abs(x), axis=0) / FP8_MAX_, MIN_SCALE_)
        q = tl.minimum(tl.maximum(x * (1.0 / row_scale), -FP8_MAX_), FP8_MAX_)  # one division per row
        tl.store(q_ptr + row * n_cols + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row, row_scale, mask=token < tokens)
