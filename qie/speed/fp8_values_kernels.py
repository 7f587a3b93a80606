"""Triton kernels of `qie.speed.fp8_values` (imported only where Triton is installed).

Both run on a grid of (samples x heads, token tiles): a program holds `TOKENS` tokens of one
`D`-wide head (`_head_tile`), and neighbouring programs read neighbouring heads of the same rows.
`qie_value_amax` folds the tile's largest magnitude into its sample and head's slot with an
integer atomic maximum (non-negative floats order as their bits do: exact, whatever the order the
programs run in). `qie_value_fp8` divides the tile by its head's scale, rounding as `to_fp8`'s
float32 division does, saturates at fp8's largest value and writes it into the joint tensor at
the stream's token offset. Kernel names show in profiles (the bench's "quantize" category).

Launch defaults, measured by the bench's "values-kernel" section at 8426 tokens x 24 heads x 128
(h200-bl): 64 tokens and 8 warps a program, 0.020 ms (maxima) + 0.028 ms (cast) a call; 64 x 4
0.021 + 0.032; 16 x 4 0.023 + 0.028; 128 tokens slower at every warp count. Floors 0.011 and 0.016 ms.
"""

import triton
import triton.language as tl

TOKENS = 64
WARPS = 8


@triton.jit
def _head_tile(x_ptr, tokens, heads, stride_b, stride_t, D: tl.constexpr, TOKENS: tl.constexpr):
    """This program's tile of x as float32 [TOKENS, D], its sample x head index, sample, head, tokens, mask."""
    bh = tl.program_id(0)
    b, h = (bh // heads).to(tl.int64), bh % heads
    t = tl.program_id(1).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
    d = tl.arange(0, D)
    live = (t < tokens)[:, None]
    x = tl.load(x_ptr + b * stride_b + t[:, None] * stride_t + h * D + d[None, :], mask=live, other=0.0)
    return x.to(tl.float32), bh, b, h, t, live


@triton.jit
def qie_value_amax(x_ptr, amax_ptr, tokens, heads, stride_b, stride_t, D: tl.constexpr, TOKENS: tl.constexpr):
    x, bh, _, _, _, _ = _head_tile(x_ptr, tokens, heads, stride_b, stride_t, D, TOKENS)
    largest = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    tl.atomic_max(amax_ptr + bh, largest.to(tl.int32, bitcast=True))


@triton.jit
def qie_value_fp8(
    x_ptr, s_ptr, out_ptr, tokens, heads, joint_tokens, offset, stride_b, stride_t,
    D: tl.constexpr, TOKENS: tl.constexpr, FP8_MAX_: tl.constexpr,
):  # fmt: skip
    x, bh, b, h, t, live = _head_tile(x_ptr, tokens, heads, stride_b, stride_t, D, TOKENS)
    q = tl.minimum(tl.maximum(tl.div_rn(x, tl.load(s_ptr + bh)), -FP8_MAX_), FP8_MAX_)
    row = b * joint_tokens + offset + t
    dest = out_ptr + (row[:, None] * heads + h) * D + tl.arange(0, D)[None, :]
    tl.store(dest, q.to(out_ptr.dtype.element_ty), mask=live)
