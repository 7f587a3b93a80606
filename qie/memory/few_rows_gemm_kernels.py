"""Triton kernels of `qie.memory.few_rows_gemm` (imported only where Triton is installed).

`qie_fp8_rows_gemm` multiplies BLOCK_M x BLOCK_N tiles of fp8 rows (`tl.dot`: on Hopper Triton's fp8 sums
stay in the tensor cores' accumulator, as cuBLAS's fast accumulation does),
scales by the two rows' scales at the end, adds the bias and rounds once, as `torch._scaled_mm` does
with rowwise scales. `qie_silu_modulations` is a block's two modulation layers, `linear(silu(temb))`,
in one launch: SiLU in the activation dtype, its bf16 values times the fp8 weights summed in float32
(no tensor cores: one or two rows), times the weight's row scale, plus the bias. Their names show in
profiles (the bench's "gemm" category).
"""

import triton
import triton.language as tl


@triton.jit
def qie_fp8_rows_gemm(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, K, stride_xm, stride_xs, stride_wn, stride_ws, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
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
    xs = tl.load(xs_ptr + offs_m * stride_xs, mask=rows, other=0.0)
    ws = tl.load(ws_ptr + offs_n * stride_ws)
    acc = acc * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=rows[:, None])


@triton.jit
def _silu_rows_gemv(
    t_ptr, w_ptr, s_ptr, b_ptr, y_ptr, tile, K, stride_t, stride_w, stride_s, stride_y,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :]
    acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        w = tl.load(w_ptrs).to(tl.float32)
        t = tl.load(t_ptr + k + offs_k).to(tl.float32)
        silu = (t / (1.0 + tl.exp(-t))).to(t_ptr.dtype.element_ty).to(tl.float32)  # SiLU in the input's dtype
        acc0 += w * silu[None, :]  # a bf16 value times an fp8 one: exact in float32
        if ROWS > 1:
            t = tl.load(t_ptr + stride_t + k + offs_k).to(tl.float32)
            silu = (t / (1.0 + tl.exp(-t))).to(t_ptr.dtype.element_ty).to(tl.float32)
            acc1 += w * silu[None, :]
        w_ptrs += BLOCK_K
    scale = tl.load(s_ptr + offs_n * stride_s)
    bias = tl.load(b_ptr + offs_n).to(tl.float32)
    tl.store(y_ptr + offs_n, (tl.sum(acc0, axis=1) * scale + bias).to(y_ptr.dtype.element_ty))
    if ROWS > 1:
        tl.store(y_ptr + stride_y + offs_n, (tl.sum(acc1, axis=1) * scale + bias).to(y_ptr.dtype.element_ty))


@triton.jit
def qie_silu_modulations(
    t_ptr, a_w, a_s, a_b, a_y, a_tiles, b_w, b_s, b_b, b_y, K, stride_t,
    stride_aw, stride_as, stride_ay, stride_bw, stride_bs, stride_by,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """`linear(silu(t))` for two fp8-row linears at once (a block's image and text modulation): the first
    `a_tiles` programs write `a_y`, the rest `b_y`; 1 or 2 rows of `t` (ROWS), each weight read once."""
    pid = tl.program_id(0)
    if pid < a_tiles:
        _silu_rows_gemv(
            t_ptr, a_w, a_s, a_b, a_y, pid, K, stride_t, stride_aw, stride_as, stride_ay, ROWS, BLOCK_N, BLOCK_K,
            STAGES,
        )  # fmt: skip
    else:
        _silu_rows_gemv(
            t_ptr, b_w, b_s, b_b, b_y, pid - a_tiles, K, stride_t, stride_bw, stride_bs, stride_by, ROWS, BLOCK_N,
            BLOCK_K, STAGES,
        )  # fmt: skip
