"""The joint attention's query/key prologue in one kernel: RMSNorm, RoPE and the text+image join.

Before its attention call, each block normalizes the queries and keys of both streams (RMSNorm over
each 128-wide head), rotates them (RoPE) and concatenates text and image tokens. Compiled, that is
a looped reduction kernel per stream plus a concatenation copy (measured on an H200 at 1024²: 9.7 +
4.5 ms of a 0.21 s forward, 60 blocks), about three times the memory traffic's time. Here one
Triton program normalizes and rotates a tile of rows held in registers and writes them straight into
the joint tensor at their token offset: each element is read once and written once.

`QwenFusedQKAttnProcessor` is diffusers' `QwenDoubleStreamAttnProcessor2_0` with that prologue:
the same projections, value concatenation, attention dispatcher (looked up at call time, so
`qie.speed.fa3` still routes it) and output projections. It needs the rotary frequencies as real
pairs (`qie.speed.rope.install`) and RMSNorms with weights in the activation dtype; any other call
goes to diffusers' own code. `install` sets it on every block, keeping each processor's attention
backend; `qie.speed.compile.compile_blocks` does so on CUDA with Triton.

Under fp8 attention (a request's `attention_quant="fp8"` with FlashAttention-3) the same kernels
write the queries and keys as fp8 under `fp8_bound_scale` (`norm_rope_join_fp8`) and the processor
hands them to FA3's fp8 forward (`qie.speed.fa3.prequantized_attention`): no pass to measure them;
the values are joined and cast by `qie.speed.fp8_values`.
Both ops are `torch.library.triton_op`s, so compiled graphs launch the kernels themselves.

The arithmetic is diffusers': variance in float32, normalized values rounded to the weight's dtype
and multiplied by the weight (rounded), then rotated in float32 and rounded (`reference`, the op's
code off CUDA and the tests' oracle). Tolerance ``qk-prologue-fused``.

Example:
    >>> install(pipe.transformer)            # doctest: +SKIP
    60
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch
from torch.library import triton_op, wrap_triton

from qie.memory.fp8_matmul import FP8, FP8_MAX, MIN_SCALE, Fp8Activations, fp8_rows, project, to_fp8
from qie.memory.norm_quantize import quantize_activations
from qie.speed import fa3, fp8_values, rope
from qie.speed.fa3 import QWEN_MODULE

log = logging.getLogger(__name__)

OP = "qie::qk_norm_rope_join"
BOUND_MARGIN = 1.02  # fp8_bound_scale's room for bf16 rounding


def reference(x: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor, eps: float) -> torch.Tensor:
    """diffusers' `RMSNorm` (weight in `x`'s dtype) then `rope.rotate`: x [B, S, H, D], freqs [S, D/2, 2]."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    normed = (x * torch.rsqrt(variance + eps)).to(weight.dtype) * weight
    return rope.rotate(normed, freqs)


@functools.cache
def _triton_kernel():
    """(the `triton` module, the kernel), or None when Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def qie_qk_norm_rope(
        x_ptr, w_ptr, f_ptr, out_ptr, s_ptr, rows, heads, stream_rows, joint_rows, offset_rows,
        EPS: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, FP8: tl.constexpr, FP8_MAX_: tl.constexpr,
    ):  # fmt: skip
        # Row r of x (flattened [B, S, H]) is token t = (r % stream_rows) // heads of sample r // stream_rows;
        # it lands in row offset_rows + r % stream_rows of that sample's [S_joint, H] block.
        r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        live = r < rows
        d = tl.arange(0, D)
        x = tl.load(x_ptr + r[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
        xf = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(xf * xf, axis=1) / D + EPS)  # a constexpr: Inductor passes floats as fp64
        w = tl.load(w_ptr + d)
        n = ((xf * inv[:, None]).to(w.dtype) * w[None, :]).to(tl.float32)
        within = r % stream_rows
        token = within // heads
        f = tl.load(f_ptr + token[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
        re, im = tl.split(tl.reshape(n, (ROWS, D // 2, 2)))
        cos, sin = tl.split(tl.reshape(f, (ROWS, D // 2, 2)))
        out = tl.reshape(tl.join(re * cos - im * sin, re * sin + im * cos), (ROWS, D))
        if FP8:  # diffusers' bf16 values, then divided by the joint tensor's scale and cast (as `to_fp8`)
            out = tl.div_rn(out.to(x.dtype).to(tl.float32), tl.load(s_ptr))
            out = tl.minimum(tl.maximum(out, -FP8_MAX_), FP8_MAX_)
        dest = (r // stream_rows) * joint_rows + offset_rows + within
        tl.store(out_ptr + dest[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=live[:, None])

    return triton, qie_qk_norm_rope


ROWS_PER_PROGRAM = 16  # 16 heads x 128 channels: 8 KB of bf16 per program


def _launch(x, weight, freqs, eps, joint, offset, scale=None) -> None:
    """One stream into `joint` at token `offset`; with `scale` (a 1-element fp32 tensor) as fp8 values."""
    triton, kernel = _triton_kernel()
    batch, tokens, heads, dim = x.shape
    rows = batch * tokens * heads
    grid = (triton.cdiv(rows, ROWS_PER_PROGRAM),)
    joint_rows = joint.shape[1] * heads
    wrap_triton(kernel)[grid](
        x, weight, freqs, joint, weight if scale is None else scale, rows, heads, tokens * heads, joint_rows,
        offset * heads, EPS=eps, D=dim, ROWS=ROWS_PER_PROGRAM, FP8=scale is not None, FP8_MAX_=FP8_MAX, num_warps=4,
    )  # fmt: skip


def _joined(txt, img, txt_weight, img_weight, txt_freqs, img_freqs, txt_eps, img_eps, scale=None) -> torch.Tensor:
    """The op's body: the joint tensor, bf16 or (with `scale`) fp8; Triton on CUDA, else the reference."""
    width = txt.shape[-1]
    if txt.is_cuda and width & (width - 1) == 0 and _triton_kernel() is not None:  # Triton tiles: powers of two
        dtype = txt.dtype if scale is None else FP8
        joint = txt.new_empty(txt.shape[0], txt.shape[1] + img.shape[1], *txt.shape[2:], dtype=dtype)
        _launch(txt.contiguous(), txt_weight, txt_freqs.contiguous(), txt_eps, joint, 0, scale)
        _launch(img.contiguous(), img_weight, img_freqs.contiguous(), img_eps, joint, txt.shape[1], scale)
        return joint
    joint = torch.cat(
        [reference(txt, txt_weight, txt_freqs, txt_eps), reference(img, img_weight, img_freqs, img_eps)], dim=1
    )
    return joint if scale is None else to_fp8(joint, scale)


@triton_op(OP, mutates_args=())
def _join_op(
    txt: torch.Tensor,
    img: torch.Tensor,
    txt_weight: torch.Tensor,
    img_weight: torch.Tensor,
    txt_freqs: torch.Tensor,
    img_freqs: torch.Tensor,
    txt_eps: float,
    img_eps: float,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    # A Triton op: compiled graphs launch the two kernels from Inductor's generated code (no call
    # back into Python per block); the body stays traceable (torch ops and `wrap_triton` launches).
    return _joined(txt, img, txt_weight, img_weight, txt_freqs, img_freqs, txt_eps, img_eps, scale)


def fp8_bound_scale(txt_weight: torch.Tensor, img_weight: torch.Tensor) -> torch.Tensor:
    """One fp32 scale (shape [1]) under which no normalized, rotated query or key can exceed fp8's 448.

    An RMS-normalized head of width D has no element above sqrt(D) in magnitude; times the norm's
    weight it stays under sqrt(D) * max|weight|, and RoPE rotates pairs without lengthening them
    (2% margin for the bf16 roundings). The bound needs no pass over the activations, so the
    prologue writes fp8 directly; fp8 keeps its 3 mantissa bits at any magnitude above 2^-6 of the
    scale, so values ~sqrt(D) below the bound lose no precision against a measured maximum.
    """
    width = txt_weight.shape[-1]
    largest = torch.maximum(txt_weight.detach().abs().amax(), img_weight.detach().abs().amax()).float()
    return (largest * (width**0.5 * BOUND_MARGIN / FP8_MAX)).clamp(min=MIN_SCALE).reshape(1)


def norm_rope_join_fp8(txt, img, txt_norm, img_norm, txt_freqs, img_freqs) -> tuple[torch.Tensor, torch.Tensor]:
    """`norm_rope_join` as fp8 (e4m3) values and their scale per sample and head ([B, H] fp32, one value:
    `fp8_bound_scale`), in the same kernels: FlashAttention-3's fp8 queries and keys, no extra pass."""
    weights = (txt_norm.weight, img_norm.weight)
    scale = fp8_bound_scale(*weights)
    joint = _join_op(txt, img, *weights, txt_freqs, img_freqs, txt_norm.eps, img_norm.eps, scale)
    return joint, scale.expand(txt.shape[0], txt.shape[2]).contiguous()


def norm_rope_join(txt, img, txt_norm, img_norm, txt_freqs, img_freqs) -> torch.Tensor:
    """`cat([rope(txt_norm(txt)), rope(img_norm(img))], dim=1)` for [B, S, H, D] tensors, one kernel per
    stream on CUDA (Triton op `qie::qk_norm_rope_join`, launched from `torch.compile`'s generated code)."""
    return _join_op(txt, img, txt_norm.weight, img_norm.weight, txt_freqs, img_freqs, txt_norm.eps, img_norm.eps)


def fusable(attn, hidden_states, image_rotary_emb) -> bool:
    """Whether the fused prologue reproduces diffusers' for this call: real frequency pairs and diffusers
    RMSNorms with weights in the activations' dtype and no bias."""
    from diffusers.models.normalization import RMSNorm

    if image_rotary_emb is None:
        return False
    if any(not isinstance(f, torch.Tensor) or f.is_complex() for f in image_rotary_emb):
        return False
    return all(
        isinstance(norm, RMSNorm)
        and norm.weight is not None
        and norm.weight.dtype == hidden_states.dtype
        and getattr(norm, "bias", None) is None
        for norm in (attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k)
    )


@functools.cache
def processor_class() -> type:
    """`QwenFusedQKAttnProcessor`, built on the installed diffusers' processor (once)."""
    qwen = importlib.import_module(QWEN_MODULE)

    class QwenFusedQKAttnProcessor(qwen.QwenDoubleStreamAttnProcessor2_0):
        """diffusers' joint-attention processor with the q/k prologue as one op (see the module docstring)."""

        def __call__(
            self,
            attn,
            hidden_states,
            encoder_hidden_states=None,
            encoder_hidden_states_mask=None,
            attention_mask=None,
            image_rotary_emb=None,
        ):
            # `hidden_states` / `encoder_hidden_states` may be fp8 rows from the block's fused prologue
            # (`qie.speed.block_prologue`): the projections multiply them as they are
            like = hidden_states.values if isinstance(hidden_states, Fp8Activations) else hidden_states
            if (
                encoder_hidden_states is None
                or attention_mask is not None
                or not fusable(attn, hidden_states, image_rotary_emb)
            ):  # diffusers' own code, its errors included
                hidden_states, encoder_hidden_states = (
                    x.dequantize() if isinstance(x, Fp8Activations) else x
                    for x in (hidden_states, encoder_hidden_states)
                )
                return super().__call__(
                    attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, attention_mask,
                    image_rotary_emb,
                )  # fmt: skip
            dtype = hidden_states.dtype
            if encoder_hidden_states_mask is not None:
                image_mask = like.new_ones(like.shape[:2], dtype=torch.bool)
                attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
            head_dim = attn.inner_dim // attn.heads
            img_freqs, txt_freqs = image_rotary_emb

            def heads(txt_proj, img_proj):  # text then image, [B, S, H, D] each
                txt, img = project(txt_proj, encoder_hidden_states), project(img_proj, hidden_states)
                return txt.unflatten(-1, (-1, head_dim)), img.unflatten(-1, (-1, head_dim))

            freqs = (txt_freqs, img_freqs)
            q_streams, k_streams = heads(attn.add_q_proj, attn.to_q), heads(attn.add_k_proj, attn.to_k)
            seq_txt = q_streams[0].shape[1]
            v_streams = heads(attn.add_v_proj, attn.to_v)
            fp8_forward = fa3.fp8_forward_now(qwen, like, self._attention_backend, self._parallel_config)
            if fp8_forward is not None:
                # fp8 attention: the prologue writes fp8 queries and keys itself (no extra pass), the
                # values are joined and cast in two passes (`fp8_values`)
                query, q_scale = norm_rope_join_fp8(*q_streams, attn.norm_added_q, attn.norm_q, *freqs)
                key, k_scale = norm_rope_join_fp8(*k_streams, attn.norm_added_k, attn.norm_k, *freqs)
                value, v_scale = fp8_values.join_fp8(*v_streams)
                joint = fa3.prequantized_attention(
                    query, q_scale, key, k_scale, value, v_scale, attention_mask, fp8_forward
                )
            else:
                value = torch.cat(v_streams, dim=1)
                query = norm_rope_join(*q_streams, attn.norm_added_q, attn.norm_q, *freqs)
                key = norm_rope_join(*k_streams, attn.norm_added_k, attn.norm_k, *freqs)
                joint = qwen.dispatch_attention_fn(
                    query,
                    key,
                    value,
                    attn_mask=attention_mask,
                    dropout_p=0.0,
                    is_causal=False,
                    backend=self._attention_backend,
                    parallel_config=self._parallel_config,
                )
            joint = joint.flatten(2, 3).to(dtype)
            if isinstance(hidden_states, Fp8Activations) and fp8_rows(attn.to_out[0]) and fp8_rows(attn.to_add_out):
                # each stream's rows read in place, quantized into fresh tensors (a slice of one joint set of
                # scales would sit off the 16-byte alignment cuBLAS's fp8 GEMM needs)
                img_in, txt_in = quantize_activations(joint[:, seq_txt:]), quantize_activations(joint[:, :seq_txt])
            else:
                img_in, txt_in = joint[:, seq_txt:, :].contiguous(), joint[:, :seq_txt, :].contiguous()
            img_out = project(attn.to_out[0], img_in)
            if len(attn.to_out) > 1:
                img_out = attn.to_out[1](img_out)  # dropout
            return img_out, project(attn.to_add_out, txt_in)

    return QwenFusedQKAttnProcessor


def available() -> bool:
    """True with CUDA and Triton: where the fused kernel runs (elsewhere the op is the PyTorch reference)."""
    return torch.cuda.is_available() and _triton_kernel() is not None


def _attentions(transformer: torch.nn.Module):
    qwen = importlib.import_module(QWEN_MODULE)
    for block in getattr(transformer, "transformer_blocks", []):
        attn = getattr(block, "attn", None)
        if attn is not None and isinstance(attn.processor, qwen.QwenDoubleStreamAttnProcessor2_0):
            yield attn


def install(transformer: torch.nn.Module) -> int:
    """Give every block of `transformer` the fused-prologue processor; returns how many changed.

    Each keeps the attention backend and parallel config of the processor it replaces; `uninstall`
    gives that processor back.
    """
    cls, changed = processor_class(), 0
    for attn in _attentions(transformer):
        if isinstance(attn.processor, cls):
            continue
        fused = cls()
        fused._attention_backend = attn.processor._attention_backend
        fused._parallel_config = attn.processor._parallel_config
        fused.qie_replaced = attn.processor
        attn.set_processor(fused)
        changed += 1
    if changed:
        log.info("attention prologue: q/k RMSNorm, RoPE and the text+image join fused in %d blocks", changed)
    return changed


def installed(transformer: torch.nn.Module) -> bool:
    """Whether `transformer`'s blocks run the fused prologue."""
    return any(isinstance(attn.processor, processor_class()) for attn in _attentions(transformer))


def uninstall(transformer: torch.nn.Module) -> None:
    """Give each block the processor `install` replaced."""
    for attn in _attentions(transformer):
        replaced = getattr(attn.processor, "qie_replaced", None)
        if replaced is not None:
            attn.set_processor(replaced)
