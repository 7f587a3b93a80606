"""The largest magnitude of each sample's head in a [B, S, H, D] tensor, in one pass: fp8 attention's value scale.

FlashAttention-3's fp8 forward takes one descale per sample and head, so before each attention call
the values ([B, S, H, D], bf16) are measured: max |v| over the tokens and the head's channels. Left
to `torch.compile`, that is a reduction over the token dimension, which lies across rows: on an
H200 at 1024² it took 3.8 ms of a 0.18 s forward (`benchmarks/bench-h200-bb.json`, kernel
`triton_red_fused_abs_amax_cat_view`), ~6× the time to read the values once. Here each Triton
program reads a tile of tokens for every head (whole rows, contiguous) and folds its maxima into
the [B, H] result with one atomic maximum per head.

A maximum is exact in any order, so the op's result equals `x.abs().amax(dim=3).amax(dim=1)` bit for
bit (in float32); off CUDA, or without Triton, the op computes exactly that.

Example:
    >>> x = torch.randn(2, 5, 3, 4)
    >>> torch.equal(head_amax(x), x.abs().amax(dim=3).amax(dim=1))
    True
"""

from __future__ import annotations

import functools

import torch
from torch.library import triton_op, wrap_triton

OP = "qie::head_amax"
TOKENS_PER_PROGRAM = 64


@functools.cache
def _triton_kernel():
    """(the `triton` module, the kernel), or None when Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def qie_head_amax(
        x_ptr, out_ptr, tokens, x_batch, x_token, H: tl.constexpr, D: tl.constexpr, TOKENS: tl.constexpr
    ):  # fmt: skip
        # Program (i, b): tokens i*TOKENS ... of sample b, every head; one atomic max per head into out[b, h].
        t = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
        b = tl.program_id(1).to(tl.int64)
        live = t < tokens
        d = tl.arange(0, D)
        rows = x_ptr + b * x_batch + t[:, None] * x_token + d[None, :]
        for h in tl.static_range(H):
            x = tl.load(rows + h * D, mask=live[:, None], other=0.0)
            tl.atomic_max(out_ptr + b * H + h, tl.max(tl.max(tl.abs(x.to(tl.float32)), axis=1), axis=0))

    return triton, qie_head_amax


def reference(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the tokens (dim 1) and channels (dim 3) of each sample and head, float32 [B, H]."""
    return x.abs().amax(dim=3).amax(dim=1).float()


def _fits(x: torch.Tensor) -> bool:
    """A CUDA tensor whose heads lie packed in each token (channels contiguous, heads D apart)."""
    if not x.is_cuda or x.dim() != 4 or x.shape[1] == 0 or _triton_kernel() is None:
        return False
    _, _, heads, dim = x.shape
    return x.stride(3) == 1 and (heads == 1 or x.stride(2) == dim) and dim & (dim - 1) == 0


@triton_op(OP, mutates_args=())
def _head_amax_op(x: torch.Tensor) -> torch.Tensor:
    # A Triton op: compiled graphs launch the kernel from Inductor's own code; the body stays traceable.
    if not _fits(x):
        return reference(x)
    triton, kernel = _triton_kernel()
    batch, tokens, heads, dim = x.shape
    out = torch.zeros(batch, heads, device=x.device, dtype=torch.float32)  # |x| >= 0: a max from zero
    grid = (triton.cdiv(tokens, TOKENS_PER_PROGRAM), batch)
    wrap_triton(kernel)[grid](
        x, out, tokens, x.stride(0), x.stride(1), H=heads, D=dim, TOKENS=TOKENS_PER_PROGRAM, num_warps=8
    )
    return out


def head_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| per sample and head of `x` ([B, S, H, D]) as float32 [B, H]; one Triton kernel on CUDA."""
    return _head_amax_op(x)
