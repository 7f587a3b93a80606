"""A candidate fp8 GEMM for few rows (the text stream's 200-500 tokens, the modulation's one row), for the
bench's "small-gemm" section (imported only where Triton is installed).

`y = (x * xs) @ (w * ws).T + bias` for fp8 rows on both sides, as `qie.memory.fp8_matmul.scaled_mm_rows`
computes it with `torch._scaled_mm`: float32 accumulation, the two row scales and the bias applied
once at the end, one rounding to the output dtype. Tiles of BLOCK_M x BLOCK_N outputs, so a weight of
3072 rows runs on 3072 / BLOCK_N x ceil(M / BLOCK_M) programs (cuBLAS's 128 x 128 tiles leave most of
an H200's 132 SMs idle at M = 234).
"""

import triton
import triton.language as tl


@triton.jit
def fp8_rows_gemm(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, K, stride_xm, stride_wn, stride_ym,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m < M
    a_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    b_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        a = tl.load(a_ptrs, mask=rows[:, None], other=0.0)
        b = tl.load(b_ptrs)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    xs = tl.load(xs_ptr + offs_m, mask=rows, other=0.0)
    ws = tl.load(ws_ptr + offs_n)
    acc = acc * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=rows[:, None])


@triton.jit
def fp8_rows_gemv(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, K, stride_wn, HAS_BIAS: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    """One row of x (M = 1): products of fp8 values are exact in float32; summed in float32."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        x = tl.load(x_ptr + k + offs_k).to(tl.float32)
        acc += tl.load(w_ptrs).to(tl.float32) * x[None, :]
        w_ptrs += BLOCK_K
    out = tl.sum(acc, axis=1) * tl.load(xs_ptr) * tl.load(ws_ptr + offs_n)
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n).to(tl.float32)
    tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty))
