"""A candidate fp8 product for one row (the modulation's `temb`), for the bench's "small-gemm" section
(imported only where Triton is installed), beside the package's tile kernel
(`qie.memory.few_rows_gemm_kernels.qie_fp8_rows_gemm`).

`y = (x * xs) @ (w * ws).T + bias` for fp8 rows on both sides, as `qie.memory.fp8_matmul.scaled_mm_rows`
computes it: products of two fp8 values (exact in float32) summed in float32 without the tensor cores,
the two row scales and the bias applied once at the end, one rounding to the output dtype.
"""

import triton
import triton.language as tl


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
