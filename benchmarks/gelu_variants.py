"""Candidate forms of the GELU + fp8 row kernel (`qie.memory.gelu_kernels`), for the bench's "gelu-graph"
section (imported only where Triton is installed).

All hold a row as CHUNKS power-of-two tiles (the MLP's 12288 = 3 x 4096) and compute what the kernel in
the package computes, row for row:
- `gelu_rows_multi`: ROWS rows per program, each row's loads issued before the previous row's reduction.
- `gelu_rows_persistent`: a grid of a few programs per SM, each looping over rows (`tl.range` with
  STAGES pipeline stages: the next row's loads in flight while this one reduces).
- `gelu_rows_joint`: the text and the image stream's rows in one launch (the same width, their own
  tensors): one kernel instead of two per block.
"""

import triton
import triton.language as tl

from qie.memory.gelu_kernels import gelu_bf16


@triton.jit
def _quantize_row(x_row, q_row, s_at, offs, valid, DTYPE: tl.constexpr, FP8_MAX_: tl.constexpr,
                  MIN_SCALE_: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr):  # fmt: skip
    g0 = gelu_bf16(tl.load(x_row + offs, mask=valid, other=0.0).to(tl.float32), DTYPE, False)
    largest = tl.abs(g0)
    if CHUNKS > 1:
        g1 = gelu_bf16(tl.load(x_row + offs + CHUNK, mask=valid, other=0.0).to(tl.float32), DTYPE, False)
        largest = tl.maximum(largest, tl.abs(g1))
    if CHUNKS > 2:
        g2 = gelu_bf16(tl.load(x_row + offs + 2 * CHUNK, mask=valid, other=0.0).to(tl.float32), DTYPE, False)
        largest = tl.maximum(largest, tl.abs(g2))
    if CHUNKS > 3:
        g3 = gelu_bf16(tl.load(x_row + offs + 3 * CHUNK, mask=valid, other=0.0).to(tl.float32), DTYPE, False)
        largest = tl.maximum(largest, tl.abs(g3))
    scale = tl.maximum(tl.max(largest, axis=0) / FP8_MAX_, MIN_SCALE_)
    inverse = 1.0 / scale
    out = q_row.dtype.element_ty
    tl.store(q_row + offs, tl.minimum(tl.maximum(g0 * inverse, -FP8_MAX_), FP8_MAX_).to(out), mask=valid)
    if CHUNKS > 1:
        q1 = tl.minimum(tl.maximum(g1 * inverse, -FP8_MAX_), FP8_MAX_)
        tl.store(q_row + offs + CHUNK, q1.to(out), mask=valid)
    if CHUNKS > 2:
        q2 = tl.minimum(tl.maximum(g2 * inverse, -FP8_MAX_), FP8_MAX_)
        tl.store(q_row + offs + 2 * CHUNK, q2.to(out), mask=valid)
    if CHUNKS > 3:
        q3 = tl.minimum(tl.maximum(g3 * inverse, -FP8_MAX_), FP8_MAX_)
        tl.store(q_row + offs + 3 * CHUNK, q3.to(out), mask=valid)
    tl.store(s_at, scale)


@triton.jit
def gelu_rows_multi(x_ptr, q_ptr, s_ptr, n_rows, stride_x, stride_q, FP8_MAX_: tl.constexpr,
                    MIN_SCALE_: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
                    ROWS: tl.constexpr):  # fmt: skip
    offs = tl.arange(0, CHUNK)
    for i in tl.static_range(ROWS):
        row = tl.program_id(0).to(tl.int64) * ROWS + i
        if row < n_rows:
            _quantize_row(x_ptr + row * stride_x, q_ptr + row * stride_q, s_ptr + row, offs, offs < CHUNK,
                          x_ptr.dtype.element_ty, FP8_MAX_, MIN_SCALE_, CHUNK, CHUNKS)  # fmt: skip


@triton.jit
def gelu_rows_persistent(x_ptr, q_ptr, s_ptr, n_rows, stride_x, stride_q, FP8_MAX_: tl.constexpr,
                         MIN_SCALE_: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
                         STAGES: tl.constexpr):  # fmt: skip
    offs = tl.arange(0, CHUNK)
    for row in tl.range(tl.program_id(0), n_rows, tl.num_programs(0), num_stages=STAGES):
        row = row.to(tl.int64)
        _quantize_row(x_ptr + row * stride_x, q_ptr + row * stride_q, s_ptr + row, offs, offs < CHUNK,
                      x_ptr.dtype.element_ty, FP8_MAX_, MIN_SCALE_, CHUNK, CHUNKS)  # fmt: skip


@triton.jit
def gelu_rows_joint(a_ptr, qa_ptr, sa_ptr, a_rows, b_ptr, qb_ptr, sb_ptr, stride_a, stride_qa, stride_b,
                    stride_qb, FP8_MAX_: tl.constexpr, MIN_SCALE_: tl.constexpr, CHUNK: tl.constexpr,
                    CHUNKS: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CHUNK)
    if row < a_rows:
        _quantize_row(a_ptr + row * stride_a, qa_ptr + row * stride_qa, sa_ptr + row, offs, offs < CHUNK,
                      a_ptr.dtype.element_ty, FP8_MAX_, MIN_SCALE_, CHUNK, CHUNKS)  # fmt: skip
    else:
        row -= a_rows
        _quantize_row(b_ptr + row * stride_b, qb_ptr + row * stride_qb, sb_ptr + row, offs, offs < CHUNK,
                      b_ptr.dtype.element_ty, FP8_MAX_, MIN_SCALE_, CHUNK, CHUNKS)  # fmt: skip
