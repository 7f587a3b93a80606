"""The joint attention's values as fp8 for FlashAttention-3: the text+image join and the cast, two passes.

Under fp8 attention the queries and keys leave their prologue in fp8 under a bound from their norms'
weights (`qie.speed.qk_prologue`); the values have no such bound, so each sample and head is scaled by
its measured largest magnitude (`qie.speed.fa3.quantize_heads`, which FA3 takes as its `v_descale`).
Compiled, that was a row reduction over the concatenated streams, a reduction over the tokens and a
cast kernel reading the two streams again: 6.7 ms per 1024² forward on an H200 (h200-bk), about four
times the memory traffic's time.

Here (`join_fp8`, Triton op `qie::join_values_fp8`, kernels in `qie.speed.fp8_values_kernels`) one
pass per stream reads tiles of tokens x one head and folds their largest magnitude into a [B, H]
buffer with atomic maxima (order-free, so the result does not depend on the schedule), and one pass
per stream casts its tiles into the joint fp8 tensor at their token offset: 2.9 ms per forward
(h200-bq). The scale is `fp8_scale` of the maxima and the cast divides as `to_fp8` does, so the
output equals `quantize_heads(torch.cat([txt, img], dim=1))` bit for bit (`reference`, the op's code
off CUDA and the tests' oracle).

Example:
    >>> txt, img = torch.randn(1, 3, 2, 8), torch.randn(1, 5, 2, 8)
    >>> values, scale = join_fp8(txt, img)
    >>> values.shape, values.dtype, scale.shape
    (torch.Size([1, 8, 2, 8]), torch.float8_e4m3fn, torch.Size([1, 2]))
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Iterator

import torch
from torch.library import triton_op, wrap_triton

from qie.memory.fp8_matmul import FP8, FP8_MAX, fp8_scale
from qie.speed.fa3 import quantize_heads

OP = "qie::join_values_fp8"
TRITON = importlib.util.find_spec("triton") is not None  # read by `fusable`, which compiled code traces
_unfused = False  # `unfused()`: the benchmarks' A/B against Inductor's compilation of `reference`


def reference(txt: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_heads` of the joint values (text then image tokens, B x S x H x D): (fp8 values, [B, H] scales)."""
    return quantize_heads(torch.cat([txt, img], dim=1))


@functools.cache
def _triton_kernels():
    """The `qie.speed.fp8_values_kernels` module, or None when Triton is not installed."""
    try:
        from qie.speed import fp8_values_kernels
    except ImportError:
        return None
    return fp8_values_kernels


def _rows(x: torch.Tensor) -> torch.Tensor:
    """`x` (B x S x H x D) with each token's heads side by side in memory (a projection's output is)."""
    if x.stride(3) == 1 and x.stride(2) == x.shape[3]:
        return x
    return x.contiguous()


def _launch(
    txt: torch.Tensor, img: torch.Tensor, tokens: int | None = None, num_warps: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's body: the two passes over each stream (`tokens` per program, `num_warps`: the benchmarks'
    sweep; defaults in `qie.speed.fp8_values_kernels`)."""
    kernels = _triton_kernels()
    tokens, num_warps = tokens or kernels.TOKENS, num_warps or kernels.WARPS
    batch, _, heads, dim = txt.shape
    joint_tokens = txt.shape[1] + img.shape[1]
    streams = [(_rows(txt), 0), (_rows(img), txt.shape[1])]
    amax = torch.zeros(batch, heads, dtype=torch.int32, device=txt.device)
    for x, _ in streams:
        grid = (batch * heads, -(-x.shape[1] // tokens))
        wrap_triton(kernels.qie_value_amax)[grid](
            x, amax, x.shape[1], heads, x.stride(0), x.stride(1), D=dim, TOKENS=tokens, num_warps=num_warps
        )
    scale = fp8_scale(amax.view(torch.float32))
    joint = txt.new_empty(batch, joint_tokens, heads, dim, dtype=FP8)
    for x, offset in streams:
        grid = (batch * heads, -(-x.shape[1] // tokens))
        wrap_triton(kernels.qie_value_fp8)[grid](
            x, scale, joint, x.shape[1], heads, joint_tokens, offset, x.stride(0), x.stride(1),
            D=dim, TOKENS=tokens, FP8_MAX_=FP8_MAX, num_warps=num_warps,
        )  # fmt: skip
    return joint, scale


@triton_op(OP, mutates_args=())
def _join_op(txt: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # A Triton op: compiled graphs launch the kernels from Inductor's generated code; the small
    # torch ops (the zeroed maxima, the scales) compile into the graph around them.
    return _launch(txt, img)


def fusable(txt: torch.Tensor, img: torch.Tensor) -> bool:
    """Whether the Triton op serves these streams: CUDA, Triton, bf16/fp16, one head width (a power of two)."""
    dim = txt.shape[-1]
    return (
        not _unfused
        and txt.is_cuda
        and txt.dtype in (torch.bfloat16, torch.float16)
        and img.dtype == txt.dtype
        and img.shape[0] == txt.shape[0]
        and img.shape[2:] == txt.shape[2:]
        and dim & (dim - 1) == 0
        and TRITON
    )


def join_fp8(txt: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint values `cat([txt, img], dim=1)` (B x S x H x D each) as fp8 (e4m3) and their scales, one
    per sample and head ([B, H] fp32: values * scale ≈ the bf16 values): the Triton op on CUDA, else
    `reference`. The two are equal bit for bit."""
    if fusable(txt, img):
        return _join_op(txt, img)
    return reference(txt, img)


@contextlib.contextmanager
def unfused() -> Iterator[None]:
    """Inside: `join_fp8` runs `reference` everywhere (the benchmarks' "off" variant; compiled callers must
    be traced again: `torch._dynamo.reset()`)."""
    global _unfused
    before, _unfused = _unfused, True
    try:
        yield
    finally:
        _unfused = before
