"""Each attention stream's query, key and value projections as one fp8 GEMM (fp8 plans).

A block's joint attention projects its image tokens with `to_q`, `to_k`, `to_v` and its text tokens
with `add_q_proj`, `add_k_proj`, `add_v_proj`: three linear layers of one input each. With fp8
weights each layer quantizes that input to fp8 rows and runs its own GEMM: compiled, one kernel
reads the input and writes three fp8 copies, then three GEMMs of N = 3072 follow (and for the
~200 text tokens, three GEMMs too small to fill the GPU). `fuse_qkv_projections` joins each
stream's three weights into one (3N × K) fp8 matrix with its scales and biases, and
`project` quantizes the input once and runs one GEMM whose output splits into q, k and v: the same
products, each row with its own scale as before, so the result equals the three layers' up to
the GEMM's summation order.

The three layers keep their weights as views of the joined matrix (no second copy); anything that
calls them (diffusers' own processor, the masked-prompt path, `state_dict`) sees the same values.
Only torchao's rowwise `Float8Tensor` storage of the resident fp8 plans is joined: the stream plan's
`Fp8RowLinear` weights are rebound by the streamer for every call.

Example:
    >>> fuse_qkv_projections(pipe.transformer)  # after quantize_transformer   # doctest: +SKIP
    120
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from qie.memory.fp8_matmul import Fp8RowLinear, quantize_rows, scaled_mm_rows
from qie.memory.fp8_mlp import fp8_rows

log = logging.getLogger(__name__)

STREAMS = {"image": ("to_q", "to_k", "to_v"), "text": ("add_q_proj", "add_k_proj", "add_v_proj")}


def _buffer(stream: str, part: str) -> str:
    return f"qie_{stream}_qkv_{part}"


def fuse_qkv(attn: nn.Module) -> int:
    """Join the q/k/v weights of each stream of `attn` whose three layers hold torchao fp8 rows of one
    input width; returns how many streams were joined (0-2). Joined again, a stream is re-joined."""
    joined = 0
    for stream, names in STREAMS.items():
        linears = [getattr(attn, name, None) for name in names]
        if any(linear is None or isinstance(linear, Fp8RowLinear) for linear in linears):
            continue
        rows = [fp8_rows(linear) for linear in linears]
        if any(r is None for r in rows) or len({r[1].dtype for r in rows}) != 1:
            continue
        if len({tuple(r[0].shape) for r in rows}) != 1 or len({r[0].device for r in rows}) != 1:
            continue
        biases = [linear.bias for linear in linears]
        if any(b is None for b in biases) != all(b is None for b in biases):
            continue
        values = torch.cat([r[0] for r in rows])
        scales = torch.cat([r[1] for r in rows])
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        start = 0
        for linear, (part, _) in zip(linears, rows, strict=True):  # the layers' weights become views
            end = start + part.shape[0]
            linear.weight.qdata, linear.weight.scale = values[start:end], scales[start:end]
            start = end
        attn.register_buffer(_buffer(stream, "values"), values, persistent=False)
        attn.register_buffer(_buffer(stream, "scales"), scales, persistent=False)
        attn.register_buffer(_buffer(stream, "bias"), bias, persistent=False)
        joined += 1
    return joined


def project(attn: nn.Module, stream: str, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """(q, k, v) of `x` for `stream` ("image" or "text") through the joined weights, or None when the
    stream was not joined. The three are views of one [..., 3N] output (`qk_prologue.packed_heads` reads
    q and k where they lie)."""
    values = getattr(attn, _buffer(stream, "values"), None)
    if values is None:
        return None
    scales, bias = getattr(attn, _buffer(stream, "scales")), getattr(attn, _buffer(stream, "bias"))
    lead, width = x.shape[:-1], x.shape[-1]
    xq, xs = quantize_rows(x.reshape(-1, width))
    out = scaled_mm_rows(xq, xs, values, scales, bias, x.dtype).reshape(*lead, values.shape[0])
    return out.split(values.shape[0] // 3, dim=-1)


def fuse_qkv_projections(transformer: nn.Module) -> int:
    """`fuse_qkv` on every block's attention of `transformer`; returns how many streams were joined."""
    blocks = getattr(transformer, "transformer_blocks", [])
    joined = sum(fuse_qkv(block.attn) for block in blocks if hasattr(block, "attn"))
    if joined:
        log.info("fp8 attention projections: q, k and v joined into one GEMM in %d streams", joined)
    return joined
