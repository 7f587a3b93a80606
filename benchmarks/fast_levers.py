"""Same-run A/B of the fast path's levers at the model's real shapes (a CUDA GPU; minutes, not the whole model).

    python -m benchmarks.fast_levers --out DIR --tag h200-x [--sections blocks,kernels,attention,text]

Sections (each on random weights of the real widths):
  blocks     a transformer of `--layers` full-size blocks, torchao fp8 rowwise + fused MLP quantization
             (`qie.memory.fp8_mlp`) + regional compile, one forward at 1024² (8192 image tokens,
             `--text-tokens` text tokens) with FA3 bf16 attention and diffusers' complex RoPE, with
             real-arithmetic RoPE (`qie.speed.rope`), then with the fp8 attention toggle, all on the same
             compiled blocks: seconds, the 60-block estimates, error against bf16 weights, kernel tables.
  gelu-warps the GELU + fp8 row kernels (whole padded row, whole tiles) at 4 to 32 warps for the row
             counts of the text stream and 512² to 1024² edits: milliseconds, best warp count per row count.
  mlp        one block MLP at 8192 tokens, torchao fp8 + compile: unfused against fused quantization
  ops        the host cost of the two Triton kernels in compiled code: as Triton ops (launched by
             Inductor's generated code) against opaque custom ops (a Python call per launch), 120 calls
             each at a small shape: wall and GPU milliseconds, host microseconds saved per call.
  kernels    `gelu_quantize_rows` (one Triton pass; also with IEEE divisions per element, and the kernel
             holding a row as whole power-of-two tiles, `row_tiles`) against
             Inductor's compiled GELU + `quantize_rows` at (8422 x 12288): milliseconds, and how many
             fp8 values differ.
  rope       one block's attention prologue (q/k norms, RoPE, text+image concatenation), compiled, with
             diffusers' complex RoPE, `qie.speed.rope`'s real arithmetic, and `qie.speed.qk_prologue`'s
             one kernel per stream: milliseconds, kernels, difference to the complex form.
  attention  FA3 bf16 against FA3 fp8 (per-head scaling compiled into the call) at (1, 8422, 24, 128):
             milliseconds and error against float32 SDPA.
  text       the text-encode stage on the full-size random Qwen2.5-VL: processor (CPU), vision tower,
             GPU busy time; eager, with the vision windows as one masked call (`qie.speed.vision_attention`),
             and with the vision blocks compiled too.
  text-stage the text-encode stage as an edit runs it (`encode_prompts`): its seconds (also without the
             language model's CUDA graphs, and their error), its parts' seconds, GPU busy time, a
             cProfile of one call, with the garbage collector's pauses per call (h200-ad also
             measured it after a compile and with `gc.freeze`: no gain).
  encode-order both encode stages as an edit runs them (the VAE encode queued before the text encoder's
             host-side image preparation, no wait between) against the same with a wait between and in
             the order before (text first), at 1024² and 768²: seconds, the timer's stage seconds.
  vae        the full-size VAE's decode and encode of one frame at 1024² and 768²: diffusers' causal 3-D
             convolutions against `qie.speed.vae_frames`' 2-D ones (milliseconds, kernels, error), then
             the 2-D decoder compiled.
  vae-compile the compiled decoder's first decode after a `--layers`-block fp8 transformer was quantized
             and compiled in the same process (an edit's order), with an empty Inductor cache, and the
             process's coordinate-descent setting after quantizing.
  coordinate-descent the fp8 blocks' compile with Inductor's coordinate-descent tuning on (torchao's
             recommendation), on checking one direction only, and off (what qie compiles with):
             first call (compile) from an empty Inductor cache, forward per 60 blocks, the outputs'
             difference.
  inductor-options qie's Inductor options for the fp8 blocks against the same with `triton.multi_kernel`
             (wider persistent reductions, benchmarked at the first call) and with `cpp_wrapper` (C++
             launch code): first call, forward and host milliseconds per 60 blocks, kernel tables by
             category (`--variants` picks some).

Writes `fast-levers-<tag>.json` in `--out` after each section; every time is a median of CUDA-event
timings after warm-up. Stopped by SIGTERM (`timeout`), it writes what it has, the blocks section's
finished variants included, and ends.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from benchmarks import profiling  # noqa: F401  (tears CUPTI down after each profile)

if TYPE_CHECKING:
    from qie.core.editor import Editor

log = logging.getLogger("benchmarks.fast_levers")

IMAGE_TOKENS = 8192  # 1024² output + 1024² condition, 16 px per token
BLOCKS = 60


def cuda_ms(fn: Callable[[], Any], repeats: int = 10, warm: int = 3) -> float:
    """Median milliseconds of `fn()` by CUDA events, after `warm` calls."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_table(fn: Callable[[], Any], repeats: int = 5, top: int = 12) -> dict[str, float]:
    """Milliseconds per call of each GPU kernel `fn` launches (profiled over `repeats` calls), largest first."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    rows: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_time_total > 0:  # kernels whose names share their first 120 characters add up
            name = event.key[:120]
            rows[name] = rows.get(name, 0.0) + event.device_time_total / 1e3 / repeats
    return dict(sorted(rows.items(), key=lambda r: -r[1])[:top])


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


@contextlib.contextmanager
def empty_inductor_cache() -> Iterator[str]:
    """Inductor's cache in a fresh, empty folder (`TORCHINDUCTOR_CACHE_DIR`, read at each compile) for
    the block, so a compile inside it is timed, not read back; the previous setting back after."""
    import tempfile

    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            yield cache
        finally:
            if before is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


def run_blocks(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """A `--layers`-block transformer, torchao fp8 + fused MLP quantization + regional compile, one forward per
    variant on the same compiled blocks: diffusers' complex RoPE (the rotary module's hook removed, so the
    blocks trace a graph with complex inputs), real-arithmetic RoPE (`qie.speed.rope`, what `compile_blocks`
    installs), and real RoPE with `fa3.fp8_attention()` toggled on (as a request's `attention_quant="fp8"`
    does); seconds, each variant's first call (its compile), error against bf16 weights, kernel table."""
    from diffusers import QwenImageTransformer2DModel

    from benchmarks import stream_gain
    from benchmarks.random_model import materialize
    from qie.memory.quantize import quantize_transformer
    from qie.speed import fa3, rope
    from qie.speed.compile import compile_blocks

    model = materialize(lambda: QwenImageTransformer2DModel(num_layers=args.layers), device, torch.bfloat16, 3)
    inputs = stream_gain.inputs(device, batch2=False, text_tokens=args.text_tokens)
    with torch.inference_mode():
        reference = model(**inputs)[0]
    if not fa3.install(device):
        return {"skipped": "needs a Hopper GPU and fa3-fwd"}
    quantize_transformer(model, device, fuse_mlp=True)
    compile_blocks(model)

    @contextlib.contextmanager
    def complex_rope():
        rope.uninstall(model)
        try:
            yield
        finally:
            rope.install(model)

    variants = {"complex rope": complex_rope, "real rope": contextlib.nullcontext, "fp8 attention": fa3.fp8_attention}
    out: dict[str, Any] = getattr(args, "partial", {})  # what main writes if the run is stopped midway
    out.update({"layers": args.layers, "text_tokens": args.text_tokens, "variants": {}})
    results = {}
    try:
        for name, context in variants.items():
            torch._dynamo.reset()  # each variant traced afresh with static shapes (a recompile would go dynamic)
            with torch.inference_mode(), context():
                start = time.perf_counter()
                results[name] = model(**inputs)[0]
                torch.cuda.synchronize()
                first = time.perf_counter() - start
                ms = cuda_ms(lambda: model(**inputs))
                kernels = kernel_table(lambda: model(**inputs), repeats=3, top=30)
            out["variants"][name] = {
                "forward_ms": ms,
                "first_call_s": first,
                "rel_error_vs_bf16_weights": rel_error(results[name], reference),
                "kernels_ms": kernels,
            }
            log.info("blocks %s: %.2f ms (%d blocks), first call %.1f s", name, ms, args.layers, first)
    finally:
        fa3.uninstall()
    ms = {name: v["forward_ms"] for name, v in out["variants"].items()}
    scale = BLOCKS / args.layers
    out["real_rope_saved_per_60_blocks_ms"] = (ms["complex rope"] - ms["real rope"]) * scale
    out["fp8_saved_per_60_blocks_ms"] = (ms["real rope"] - ms["fp8 attention"]) * scale
    out["real_rope_rel_change"] = rel_error(results["real rope"], results["complex rope"])
    out["fp8_changed_the_output"] = not torch.equal(results["real rope"], results["fp8 attention"])
    return out


def run_rope(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The attention prologue of one block at the real shapes, compiled: the q/k RMSNorms, RoPE and the
    text+image concatenation of both streams, with diffusers' complex RoPE, `qie.speed.rope`'s real
    arithmetic (Inductor fuses it) and `qie.speed.qk_prologue`'s one kernel per stream; milliseconds,
    kernel tables, largest difference to the complex form."""
    from diffusers.models.normalization import RMSNorm
    from diffusers.models.transformers import transformer_qwenimage as qwen

    from qie.speed import qk_prologue, rope

    gen = torch.Generator(device=device).manual_seed(0)
    shapes = {"img": IMAGE_TOKENS, "txt": args.text_tokens}
    q = {s: torch.randn(1, n, 24, 128, device=device, generator=gen).bfloat16() for s, n in shapes.items()}
    k = {s: torch.randn(1, n, 24, 128, device=device, generator=gen).bfloat16() for s, n in shapes.items()}
    angles = {s: torch.rand(n, 64, device=device, generator=gen) * 100 for s, n in shapes.items()}
    freqs = {s: torch.polar(torch.ones_like(a), a) for s, a in angles.items()}
    real = {s: torch.view_as_real(f) for s, f in freqs.items()}
    norms = {name: RMSNorm(128, eps=1e-6).to(device, torch.bfloat16) for name in ("q", "k", "aq", "ak")}

    def unfused(apply, f):
        img_q = apply(norms["q"](q["img"]), f["img"])
        img_k = apply(norms["k"](k["img"]), f["img"])
        txt_q = apply(norms["aq"](q["txt"]), f["txt"])
        txt_k = apply(norms["ak"](k["txt"]), f["txt"])
        return torch.cat([txt_q, img_q], dim=1), torch.cat([txt_k, img_k], dim=1)

    def fused():
        join = qk_prologue.norm_rope_join
        return (
            join(q["txt"], q["img"], norms["aq"], norms["q"], real["txt"], real["img"]),
            join(k["txt"], k["img"], norms["ak"], norms["k"], real["txt"], real["img"]),
        )

    variants = {
        "complex rope": lambda: unfused(lambda x, f: qwen.apply_rotary_emb_qwen(x, f, use_real=False), freqs),
        "real rope": lambda: unfused(rope.rotate, real),
        "fused kernel": fused,
    }
    out: dict[str, Any] = {"tokens": IMAGE_TOKENS + args.text_tokens, "heads": 24, "head_dim": 128}
    results = {}
    for name, fn in variants.items():
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True)
        with torch.inference_mode():
            results[name] = compiled()
            out[f"{name}_ms"] = cuda_ms(compiled, repeats=30)
            out[f"{name}_kernels_ms"] = kernel_table(compiled)
        out[f"{name}_max_abs_vs_complex"] = max(
            (a.float() - b.float()).abs().max().item()
            for a, b in zip(results["complex rope"], results[name], strict=True)
        )
    for name in ("real rope", "fused kernel"):
        out[f"{name}_saved_per_forward_ms"] = (out["complex rope_ms"] - out[f"{name}_ms"]) * BLOCKS
    return out


def run_kernels(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The fused GELU + fp8 row quantization against Inductor's kernel for the same arithmetic."""
    from torch._library.triton import set_wrap_triton_enabled

    from qie.memory.fp8_mlp import _launch, gelu_quantize_reference, gelu_quantize_rows

    h = torch.randn(IMAGE_TOKENS + args.text_tokens, 12288, device=device, dtype=torch.bfloat16) * 2
    compiled = torch.compile(gelu_quantize_reference)
    with torch.inference_mode():
        fused_v, fused_s = gelu_quantize_rows(h)
        ref_v, ref_s = compiled(h)
        eager_v, eager_s = gelu_quantize_reference(h)
        fused_ms = cuda_ms(lambda: gelu_quantize_rows(h), repeats=50)
        with set_wrap_triton_enabled(False):  # a plain launch, as inside the op (not the tracing wrapper's)
            ieee_ms = cuda_ms(lambda: _launch(h, ieee=True), repeats=50)  # IEEE divisions per element
            ieee_v, _ = _launch(h, ieee=True)
            tiled_ms = cuda_ms(lambda: _launch(h, tiled=True), repeats=50)  # whole power-of-two tiles
            tiled_v, tiled_s = _launch(h, tiled=True)
            row_ms = cuda_ms(lambda: _launch(h, tiled=False), repeats=50)
            row_v, row_s = _launch(h, tiled=False)
        inductor_ms = cuda_ms(lambda: compiled(h), repeats=50)
    traffic = h.numel() * 3 / 1e9  # bf16 in, fp8 out (GB)
    return {
        "shape": list(h.shape),
        "fused_ms": fused_ms,
        "row_kernel_ms": row_ms,
        "tiled_kernel_ms": tiled_ms,
        "tiled_gb_s": traffic / tiled_ms * 1e3,
        "tiled_equals_row_kernel": torch.equal(tiled_v.float(), row_v.float()) and torch.equal(tiled_s, row_s),
        "ieee_division_ms": ieee_ms,
        "inductor_ms": inductor_ms,
        "traffic_gb": traffic,
        "fused_gb_s": traffic / fused_ms * 1e3,
        "values_differing_vs_eager": int((fused_v.float() != eager_v.float()).sum()),
        "values_differing_ieee_vs_eager": int((ieee_v.float() != eager_v.float()).sum()),
        "values_differing_inductor_vs_eager": int((ref_v.float() != eager_v.float()).sum()),
        "max_scale_rel_diff": ((fused_s - eager_s).abs() / eager_s).max().item(),
        "dequantized_rel_error_vs_eager": rel_error(fused_v.float() * fused_s, eager_v.float() * eager_s),
    }


def run_gelu_warps(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The GELU + fp8 row kernels (whole row padded to a power of two; whole power-of-two tiles) at each
    warp count, for the row counts of the text stream, 512², 768² and 1024² edits (12288 columns):
    milliseconds per call, launched plainly (no autotuning), and the best warp count per row count."""
    from torch._library.triton import set_wrap_triton_enabled

    from qie.memory.fp8_mlp import _launch

    out: dict[str, Any] = {"cols": 12288, "ms": {}, "best": {}}
    with torch.inference_mode(), set_wrap_triton_enabled(False):  # plain launches, as inside the op
        for rows in (args.text_tokens, 2048, 4608, IMAGE_TOKENS):
            h = torch.randn(rows, 12288, device=device, dtype=torch.bfloat16) * 2
            for kernel in ("row", "tiled"):
                times = {}
                for warps in (4, 8, 16, 32):
                    launch = functools.partial(_launch, h, tiled=kernel == "tiled", num_warps=warps)
                    times[warps] = cuda_ms(launch, repeats=30)
                out["ms"][f"{kernel} {rows}"] = times
                best = min(times, key=times.get)
                out["best"][f"{kernel} {rows}"] = {"num_warps": best, "ms": times[best]}
                log.info("gelu %s kernel, %d rows: %s", kernel, rows, {w: round(t, 4) for w, t in times.items()})
    # The op compiled with dynamic rows: does the first call's row count fix the kernel's configuration
    # for every later size? (Inductor autotunes a user kernel's configurations once, at its first call.)
    from qie.memory.fp8_mlp import gelu_quantize_rows

    big = torch.randn(IMAGE_TOKENS, 12288, device=device, dtype=torch.bfloat16) * 2
    for first in (args.text_tokens, IMAGE_TOKENS):
        with empty_inductor_cache(), torch.inference_mode():
            torch._dynamo.reset()
            compiled = torch.compile(gelu_quantize_rows, dynamic=True, fullgraph=True)
            compiled(torch.randn(first, 12288, device=device, dtype=torch.bfloat16))
            out[f"compiled, first call {first} rows: ms at {IMAGE_TOKENS} rows"] = cuda_ms(lambda c=compiled: c(big))
    return out


def run_mlp(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One block MLP (3072 -> 12288 -> 3072, torchao fp8 rowwise, compiled) at 8192 tokens: unfused vs fused."""
    from diffusers.models.attention import FeedForward

    from benchmarks.random_model import materialize
    from qie.memory.quantize import quantize_transformer

    x = torch.randn(1, IMAGE_TOKENS, 3072, device=device, dtype=torch.bfloat16)
    out: dict[str, Any] = {"tokens": IMAGE_TOKENS}
    results = {}
    for name, fuse in (("unfused", False), ("fused", True)):
        torch.compiler.reset()
        block = torch.nn.Module()  # the names quantize_transformer and fuse_mlp_quantization look for
        block.img_mlp = materialize(
            lambda: FeedForward(3072, dim_out=3072, activation_fn="gelu-approximate"), device, torch.bfloat16, 5
        )
        holder = torch.nn.Module()
        holder.transformer_blocks = torch.nn.ModuleList([block])
        quantize_transformer(holder, device, fuse_mlp=fuse)
        mlp = torch.compile(block.img_mlp, fullgraph=True)
        with torch.inference_mode():
            results[name] = mlp(x)
            out[f"{name}_ms"] = cuda_ms(lambda m=mlp: m(x), repeats=30)
            out[f"{name}_kernels_ms"] = kernel_table(lambda m=mlp: m(x))
    out["saved_per_forward_ms"] = (out["unfused_ms"] - out["fused_ms"]) * BLOCKS
    out["fused_rel_error_vs_unfused"] = rel_error(results["fused"], results["unfused"])
    return out


def run_attention(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """FA3 bf16 vs fp8 at the real shape; the fp8 call includes its quantization, compiled."""
    from qie.speed import fa3

    if not fa3.available(device):
        return {"skipped": "needs a Hopper GPU and fa3-fwd"}
    tokens = IMAGE_TOKENS + args.text_tokens
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, tokens, 24, 128, device=device, generator=gen).bfloat16() for _ in range(3))
    bf16, fp8 = fa3.fa3_kernel(), torch.compile(fa3.fa3_fp8_kernel())
    with torch.inference_mode():
        ref = fa3.reference_kernel(q.float(), k.float(), v.float(), None)
        out_bf16, out_fp8 = bf16(q, k, v, None), fp8(q, k, v, None)
        return {
            "tokens": tokens,
            "bf16_ms": cuda_ms(lambda: bf16(q, k, v, None), repeats=30),
            "fp8_ms_with_quantization": cuda_ms(lambda: fp8(q, k, v, None), repeats=30),
            "bf16_rel_error": rel_error(out_bf16, ref),
            "fp8_rel_error": rel_error(out_fp8, ref),
            "fp8_max_abs_error": (out_fp8.float() - ref).abs().max().item(),
        }


def wall_ms(fn: Callable[[], Any], repeats: int = 20, warm: int = 3, until_done: bool = True) -> float:
    """Median milliseconds of `fn()` by the host clock, synchronized before and after (launch costs included).

    `until_done=False`: not synchronized after, so only the host's time in `fn()` from an idle GPU: the
    launch cost, which sets the pace wherever the GPU's share of a call is smaller.
    """
    for _ in range(warm):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if until_done:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def run_ops(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Host cost of the two Triton kernels inside compiled code: registered as Triton ops (Inductor launches
    them from its generated code, as qie does now) against opaque custom ops (a call back into Python per
    launch, as before). Each compiled function makes 120 calls on disjoint slices of one tensor, at a
    small shape where launches dominate: wall and kernel milliseconds, host microseconds per call."""
    from torch._library.triton import set_wrap_triton_enabled
    from torch.library import custom_op

    from qie.memory import fp8_mlp
    from qie.memory.fp8_matmul import FP8
    from qie.speed import qk_prologue

    if not qk_prologue.available():
        return {"skipped": "needs Triton"}

    @custom_op("qiebench::gelu_quantize_rows_opaque", mutates_args=())
    def opaque_gelu(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with set_wrap_triton_enabled(False):
            return fp8_mlp._launch(h)

    @opaque_gelu.register_fake
    def _(h):
        return h.new_empty(h.shape, dtype=FP8), h.new_empty((h.shape[0], 1), dtype=torch.float32)

    @custom_op("qiebench::qk_norm_rope_join_opaque", mutates_args=())
    def opaque_join(
        txt: torch.Tensor, img: torch.Tensor, tw: torch.Tensor, iw: torch.Tensor, tf: torch.Tensor, imf: torch.Tensor
    ) -> torch.Tensor:
        with set_wrap_triton_enabled(False):  # the op's body, launched from Python
            return qk_prologue._joined(txt, img, tw, iw, tf, imf, 1e-6, 1e-6)

    @opaque_join.register_fake
    def _(txt, img, tw, iw, tf, imf):
        return txt.new_empty(txt.shape[0], txt.shape[1] + img.shape[1], *txt.shape[2:])

    calls, rows, text, image = 120, 64, 16, 48
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(calls * rows, 12288, device=device, generator=gen).bfloat16()
    txt = torch.randn(1, calls * text, 24, 128, device=device, generator=gen).bfloat16()
    img = torch.randn(1, calls * image, 24, 128, device=device, generator=gen).bfloat16()
    tw, iw = torch.ones(128, device=device, dtype=torch.bfloat16), torch.ones(128, device=device, dtype=torch.bfloat16)
    tf, imf = torch.zeros(text, 64, 2, device=device), torch.zeros(image, 64, 2, device=device)
    tf[..., 0] = imf[..., 0] = 1.0

    def gelu_chain(op):
        def chain(h):  # disjoint row slices: no two calls are the same (nothing to deduplicate)
            return sum(op(h[i * rows : (i + 1) * rows])[1].sum() for i in range(calls))

        return chain

    def join_chain(op):
        def chain(txt, img):
            parts = (op(txt[:, i * text : (i + 1) * text], img[:, i * image : (i + 1) * image]) for i in range(calls))
            return sum(p[0, 0, 0, 0].float() for p in parts)

        return chain

    def join(a, b):
        return qk_prologue._join_op(a, b, tw, iw, tf, imf, 1e-6, 1e-6)

    variants = {
        "gelu as triton_op": (gelu_chain(fp8_mlp.gelu_quantize_rows), (h,)),
        "gelu as opaque custom_op": (gelu_chain(opaque_gelu), (h,)),
        "qk join as triton_op": (join_chain(join), (txt, img)),
        "qk join as opaque custom_op": (join_chain(lambda a, b: opaque_join(a, b, tw, iw, tf, imf)), (txt, img)),
    }
    out: dict[str, Any] = getattr(args, "partial", {})  # what main writes if the run is stopped midway
    out.update({"calls": calls, "gelu_rows": rows, "join_tokens": [text, image], "variants": {}})
    with torch.inference_mode():
        for name, (fn, inputs) in variants.items():
            torch.compiler.reset()
            compiled = torch.compile(fn, fullgraph=True)
            start = time.perf_counter()
            compiled(*inputs)
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            kernels = kernel_table(lambda c=compiled, i=inputs: c(*i), repeats=3, top=6)
            out["variants"][name] = {
                "wall_ms": wall_ms(lambda c=compiled, i=inputs: c(*i)),
                "gpu_ms": cuda_ms(lambda c=compiled, i=inputs: c(*i)),
                "compile_s": first,
                "kernels_ms": kernels,
            }
            log.info("ops %s: %.2f ms wall for %d calls", name, out["variants"][name]["wall_ms"], calls)
    v = out["variants"]
    for op in ("gelu", "qk join"):
        if f"{op} as opaque custom_op" not in v:
            continue
        saved = v[f"{op} as opaque custom_op"]["wall_ms"] - v[f"{op} as triton_op"]["wall_ms"]
        out[f"{op.replace(' ', '_')}_host_us_saved_per_call"] = saved / calls * 1e3
    return out


def run_text(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Where the text-encode stage's time goes, eager and with the language model's layers compiled."""
    from benchmarks.probes import PROMPT, test_image
    from benchmarks.random_model import build_random_pipeline
    from qie.core import stages

    pipe = build_random_pipeline(device, transformer_layers=1)
    pipe.transformer.to("cpu")
    images = stages.prompt_images(pipe, [test_image(1024)])
    visual = pipe.text_encoder.model.visual
    text = pipe.prompt_template_encode.format(stages.IMAGE_PROMPT.format(1) + PROMPT)  # as encode_prompt builds it
    marks: dict[str, float] = {}

    def pre(*_):
        torch.cuda.synchronize()
        marks["v0"] = time.perf_counter()

    def post(*_):
        torch.cuda.synchronize()
        marks["v1"] = time.perf_counter()

    def measure(label: str) -> dict[str, Any]:
        with torch.inference_mode():
            for _ in range(3):
                stages.encode_prompt(pipe, PROMPT, images, device=device)
            torch.cuda.synchronize()
            rows = []
            for _ in range(5):
                t0 = time.perf_counter()
                pipe.processor(text=[text], images=images, padding=True, return_tensors="pt")
                t1 = time.perf_counter()
                handles = [visual.register_forward_pre_hook(pre), visual.register_forward_hook(post)]
                stages.encode_prompt(pipe, PROMPT, images, device=device)
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                for h in handles:
                    h.remove()
                rows.append({"processor_s": t1 - t0, "total_s": t2 - t1, "vision_s": marks["v1"] - marks["v0"]})
            plain = []
            for _ in range(5):
                t0 = time.perf_counter()
                stages.encode_prompt(pipe, PROMPT, images, device=device)
                torch.cuda.synchronize()
                plain.append(time.perf_counter() - t0)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                stages.encode_prompt(pipe, PROMPT, images, device=device)
                torch.cuda.synchronize()
        busy = sum(e.device_time_total for e in prof.key_averages()) / 1e6
        kernels = sum(e.count for e in prof.key_averages() if e.device_time_total > 0)
        summary = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        summary["encode_s"] = statistics.median(plain)
        summary["gpu_busy_s"] = busy
        summary["gpu_ops"] = kernels
        log.info("text %s: %s", label, summary)
        return summary

    from qie.speed import vision_attention

    def embeds():
        with torch.inference_mode():
            return stages.encode_prompt(pipe, PROMPT, images, device=device).embeds

    out: dict[str, Any] = {"eager": measure("eager")}
    plain = embeds()
    vision_attention.install(pipe.text_encoder)
    out["vision_masked"] = measure("vision attention masked")
    out["vision_masked"]["rel_error_vs_eager"] = rel_error(embeds(), plain)
    try:
        start = time.perf_counter()
        for block in visual.blocks:
            block.compile()
        out["vision_masked_compiled"] = measure("vision attention masked, vision blocks compiled")
        out["vision_masked_compiled"]["compile_s"] = time.perf_counter() - start
    except Exception as exc:  # a measurement, not a feature: record why it could not run
        out["vision_masked_compiled"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return out


def encoders_editor(device: torch.device) -> Editor:
    """An `Editor` over the full-size random pipeline with one transformer block (the encoders are what is
    timed), qie's speed setup, the resident plan and its caches off."""
    from benchmarks.random_model import build_random_pipeline
    from qie.core.editor import Editor
    from qie.core.encode_cache import EditCache
    from qie.core.speed_setup import setup_speed
    from qie.memory.plans import PLANS

    pipe = build_random_pipeline(device, transformer_layers=1)
    setup_speed(pipe, device, torch.bfloat16)
    plan = PLANS["resident"]
    plan.apply(pipe, device, None)
    editor = Editor(pipe, model="random-full", device=device, dtype=torch.bfloat16, plan=plan)
    editor.cache = EditCache(max_entries=0)
    return editor


def run_text_stage(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The text-encode stage as an edit runs it (`encode_cache.encode_prompts`, caches off, fast mode: no negative
    prompt) on the full-size random Qwen2.5-VL with qie's speed setup: its seconds, the seconds of its
    parts (image digests, the ~384² resize, the processor, the encoder call), GPU busy time and kernel
    count, and a cProfile of one call (host functions by own and cumulative time)."""
    import cProfile
    import gc
    import io
    import pstats

    from benchmarks.probes import make_request
    from benchmarks.profiling import GcPauses
    from qie.core import encode_cache, stages
    from qie.core.encode_cache import digests_of
    from qie.speed import text_graphs

    editor = encoders_editor(device)
    pipe = editor.pipe
    request = make_request(1024, 4, False)
    images = request.images

    def stage() -> None:  # what `Editor.encode` times as "text_encode"
        with torch.inference_mode():
            encode_cache.encode_prompts(
                editor.cache,
                pipe,
                request,
                model=editor.model,
                revision=None,
                fixes=editor.fixes,
                device=device,
                uses_cfg=False,
            )
        torch.cuda.synchronize()

    def wall(fn: Callable[[], Any]) -> float:
        """Median seconds of 7 synchronized calls after one warm-up (`wall_ms`)."""
        return wall_ms(fn, repeats=7, warm=1) / 1e3

    small = stages.prompt_images(pipe, images)
    text = pipe.prompt_template_encode.format(stages.IMAGE_PROMPT.format(1) + request.prompt)

    def encoder_call() -> None:
        with torch.inference_mode():
            stages.encode_prompt(pipe, request.prompt, small, device=device)

    def stage_in_context(label: str) -> dict[str, Any]:
        """The stage's median seconds, and the collector's pauses per call, in this process as it is now."""
        with GcPauses() as pauses:
            seconds = wall(stage)
        row = {"stage_s": seconds, "gc_s_per_call": pauses.seconds / 8, "python_objects": len(gc.get_objects())}
        row.update({f"gc_gen{g}_per_call": n / 8 for g, n in pauses.collections.items()})
        log.info("text stage %s: %s", label, row)
        return row

    out: dict[str, Any] = args.partial
    out["fresh"] = stage_in_context("fresh")  # with the language model's CUDA graphs, as `setup_speed` installs
    with torch.inference_mode():
        graphed = stages.encode_prompt(pipe, request.prompt, small, device=device).embeds
    text_graphs.uninstall(pipe.text_encoder)
    out["without_text_graphs"] = stage_in_context("without the language model's CUDA graphs")
    with torch.inference_mode():
        eager = stages.encode_prompt(pipe, request.prompt, small, device=device).embeds
    out["text_graphs_rel_error"] = rel_error(graphed, eager)
    text_graphs.install(pipe.text_encoder)
    out.update(
        digests_s=wall(lambda: digests_of(images)),
        prompt_images_s=wall(lambda: stages.prompt_images(pipe, images)),
        processor_s=wall(lambda: pipe.processor(text=[text], images=small, padding=True, return_tensors="pt")),
        encode_prompt_s=wall(encoder_call),
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        stage()
    averages = prof.key_averages()
    out["gpu_busy_s"] = sum(e.device_time_total for e in averages) / 1e6
    out["gpu_kernels"] = sum(e.count for e in averages if e.device_time_total > 0)
    profile = cProfile.Profile()
    profile.enable()
    stage()
    profile.disable()
    for key in ("tottime", "cumulative"):
        text_out = io.StringIO()
        pstats.Stats(profile, stream=text_out).sort_stats(key).print_stats(30)
        out[f"cprofile_{key}"] = text_out.getvalue()[-6000:]
    return out


def run_encode_order(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Both encode stages of an edit (`Editor.encode`, caches off, fast mode: no negative prompt) on the
    full-size random pipeline at 1024² and 768², as an edit runs them (the condition's VAE encode queued,
    then the text encoder's host-side image preparation, no wait between) against the same calls with a
    wait for the GPU between the two stages (no overlap) and in the order before (text, then condition):
    median seconds of 7 synchronized calls, and the stage seconds the edit's timer reports."""
    from benchmarks.probes import make_request
    from qie.core import encode_cache
    from qie.core.grouping import condition_area
    from qie.telemetry import StageTimer

    editor = encoders_editor(device)
    pipe = editor.pipe
    ids = {"model": editor.model, "revision": None}
    out: dict[str, Any] = {"sizes": {}}
    for size in (1024, 768):
        request = make_request(size, 4, False)

        def condition(r=request) -> None:
            digests = encode_cache.digests_of(r.images)
            encode_cache.encode_condition(
                editor.cache, pipe, r, **ids, area=condition_area(r), device=device,
                dtype=pipe.text_encoder.dtype, digests=digests,
            )  # fmt: skip

        def text(r=request) -> None:
            encode_cache.encode_prompts(editor.cache, pipe, r, **ids, fixes=editor.fixes, device=device, uses_cfg=False)

        def as_edit(r=request) -> None:
            editor.encode(r, StageTimer(device), uses_cfg=False)

        def waiting() -> None:
            condition()
            torch.cuda.synchronize()
            text()

        def text_first() -> None:
            text()
            torch.cuda.synchronize()
            condition()

        row: dict[str, Any] = {}
        with torch.inference_mode():
            for name, fn in (("as an edit", as_edit), ("wait between", waiting), ("text first", text_first)):
                row[f"{name}_s"] = wall_ms(fn, repeats=7, warm=1) / 1e3
            row["condition alone_s"] = wall_ms(condition, repeats=7, warm=1) / 1e3
            timer = StageTimer(device)
            editor.encode(request, timer, uses_cfg=False)
            row["timer_s"] = timer.timings
        row["overlap_saved_s"] = row["wait between_s"] - row["as an edit_s"]
        out["sizes"][str(size)] = row
        log.info("encode order %d²: %s", size, row)
    return out


def run_vae(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The full-size VAE's decode and encode of one frame: diffusers' causal 3-D convolutions against
    `qie.speed.vae_frames`' 2-D convolutions, then with the decoder compiled."""
    from diffusers import AutoencoderKLQwenImage

    from benchmarks.random_model import materialize
    from qie.speed import vae_frames

    vae = materialize(AutoencoderKLQwenImage, device, torch.bfloat16, seed=1)
    out: dict[str, Any] = args.partial
    for size in (1024, 768):
        gen = torch.Generator(device=device).manual_seed(size)
        latents = torch.randn(
            1, vae.config.z_dim, 1, size // 8, size // 8, device=device, dtype=torch.bfloat16, generator=gen
        )
        pixels = torch.rand(1, 3, 1, size, size, device=device, generator=gen).to(torch.bfloat16) * 2 - 1

        def decode(latents=latents):
            return vae.decode(latents, return_dict=False)[0]

        def encode(pixels=pixels):
            return vae.encode(pixels).latent_dist.mode()

        row: dict[str, Any] = {}
        with torch.inference_mode():
            want_image, want_latents = decode(), encode()
            row["decode_ms_3d"], row["encode_ms_3d"] = cuda_ms(decode, 5, 2), cuda_ms(encode, 5, 2)
            if size == 1024:
                row["decode_kernels_3d"] = kernel_table(decode, repeats=2, top=8)
            vae_frames.install(vae)
            try:
                got_image, got_latents = decode(), encode()
                row["decode_ms_2d"], row["encode_ms_2d"] = cuda_ms(decode, 5, 2), cuda_ms(encode, 5, 2)
                if size == 1024:
                    row["decode_kernels_2d"] = kernel_table(decode, repeats=2, top=8)
            finally:
                vae_frames.uninstall(vae)
        row["decode_rel_error"] = rel_error(got_image, want_image)
        row["decode_max_abs"] = (got_image.float() - want_image.float()).abs().max().item()
        row["encode_rel_error"] = rel_error(got_latents, want_latents)
        log.info("vae %d: %s", size, {k: v for k, v in row.items() if "kernels" not in k})
        out[str(size)] = row
    vae_frames.install(vae)
    start = time.perf_counter()
    vae.decoder.compile()
    latents = torch.randn(1, vae.config.z_dim, 1, 128, 128, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        vae.decode(latents, return_dict=False)
        torch.cuda.synchronize()
        out["compiled_2d_first_decode_s"] = time.perf_counter() - start
        out["compiled_2d_decode_ms_1024"] = cuda_ms(lambda: vae.decode(latents, return_dict=False), 5, 2)
    log.info("vae compiled: %s", {k: v for k, v in out.items() if k.startswith("compiled")})
    return out


def run_vae_compile(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The compiled VAE decoder's first decode in an edit's order: after a `--layers`-block fp8 transformer was
    quantized (`quantize_transformer`) and compiled (`compile_blocks`) in the same process, with an empty
    Inductor cache (a fresh folder), so the decoder's compile is timed, not read back. Also the process's
    coordinate-descent setting after quantizing (torchao would turn it on; h200-ah: that first decode took
    195 s, 17.8 s alone in h200-ac) and the steady decode."""

    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    from benchmarks import stream_gain
    from benchmarks.random_model import materialize
    from qie.memory.quantize import quantize_transformer
    from qie.speed import fa3, vae_frames
    from qie.speed.compile import compile_blocks, compile_vae_decoder

    out: dict[str, Any] = args.partial
    latents = torch.randn(1, 16, 1, 128, 128, device=device, dtype=torch.bfloat16)
    with empty_inductor_cache():
        model = materialize(lambda: QwenImageTransformer2DModel(num_layers=args.layers), device, torch.bfloat16, 3)
        inputs = stream_gain.inputs(device, batch2=False, text_tokens=args.text_tokens)
        fa3.install(device)
        try:
            quantize_transformer(model, device, fuse_mlp=True)
            out["coordinate_descent_tuning_after_quantize"] = torch._inductor.config.coordinate_descent_tuning
            compile_blocks(model)
            with torch.inference_mode():
                start = time.perf_counter()
                model(**inputs)
                torch.cuda.synchronize()
            out["transformer_first_call_s"] = time.perf_counter() - start
            vae = materialize(AutoencoderKLQwenImage, device, torch.bfloat16, seed=1)
            vae_frames.install(vae)
            compile_vae_decoder(vae, "on")
            with torch.inference_mode():
                start = time.perf_counter()
                vae.decode(latents, return_dict=False)
                torch.cuda.synchronize()
                out["first_decode_s"] = time.perf_counter() - start
                out["decode_ms"] = cuda_ms(lambda: vae.decode(latents, return_dict=False), 3, 1)
        finally:
            fa3.uninstall()
    log.info("vae compile after the transformer's: %s", out)
    return out


def compile_variants(
    args: argparse.Namespace, device: torch.device, variants: dict[str, dict[str, Any]], kernels: bool = False
) -> dict[str, Any]:
    """The fp8 blocks compiled once per set of Inductor options in `variants`: a `--layers`-block fp8
    transformer quantized (`quantize_transformer`) and compiled (`compile_blocks`) afresh per variant, each
    from an empty Inductor cache; its first call (the compile), its forward scaled to 60 blocks, the outputs'
    change against the first variant and, with `kernels`, its kernel table (ms per forward of the blocks)."""
    from diffusers import QwenImageTransformer2DModel

    from benchmarks import stream_gain
    from benchmarks.profiling import classify
    from benchmarks.random_model import materialize
    from qie.memory.quantize import quantize_transformer
    from qie.speed import fa3
    from qie.speed.compile import compile_blocks, uncompile_blocks

    build = functools.partial(QwenImageTransformer2DModel, num_layers=args.layers)
    out: dict[str, Any] = args.partial
    out.update({"layers": args.layers, "text_tokens": args.text_tokens, "variants": {}})
    inputs = stream_gain.inputs(device, batch2=False, text_tokens=args.text_tokens)
    results = {}
    fa3.install(device)
    try:
        for name, options in variants.items():
            with empty_inductor_cache():  # each variant compiles from nothing
                torch._dynamo.reset()
                model = materialize(build, device, torch.bfloat16, 3)
                quantize_transformer(model, device, fuse_mlp=True)
                model._qie_inductor_options = options
                compile_blocks(model)
                with torch.inference_mode():
                    start = time.perf_counter()
                    results[name] = model(**inputs)[0]
                    torch.cuda.synchronize()
                    first = time.perf_counter() - start
                    ms = cuda_ms(lambda m=model: m(**inputs))
                    host = wall_ms(lambda m=model: m(**inputs), until_done=False)
                    table = kernel_table(lambda m=model: m(**inputs), repeats=3, top=40) if kernels else {}
                row: dict[str, Any] = {
                    "options": options,
                    "first_call_s": first,
                    "forward_ms": ms,
                    "forward_ms_per_60_blocks": ms * BLOCKS / args.layers,
                    "host_ms": host,
                    "host_ms_per_60_blocks": host * BLOCKS / args.layers,
                    "rel_change_vs_first": rel_error(results[name], next(iter(results.values()))),
                }
                if table:
                    row["kernels_ms"] = table
                    categories: dict[str, float] = {}
                    for kernel, kernel_ms in table.items():
                        category = classify(kernel)
                        categories[category] = categories.get(category, 0.0) + kernel_ms
                    row["categories_ms"] = categories
                out["variants"][name] = row
                log.info("%s: first call %.1f s, %.2f ms (%d blocks)", name, first, ms, args.layers)
                uncompile_blocks(model)
                del model
                torch.cuda.empty_cache()
    finally:
        fa3.uninstall()
    return out


def run_coordinate_descent(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Inductor's coordinate-descent tuning for the fp8 blocks' compile, on and off (`compile_variants`).
    "on" is torchao's recommendation (`TORCHAO_INDUCTOR_OPTIONS`), "on, one direction" the same tuning
    without `coordinate_descent_check_all_directions` (fewer candidates tried), "off" what qie compiles
    with (`QUANTIZED_INDUCTOR_OPTIONS`, torchao's options without coordinate descent)."""
    from qie.memory.quantize import QUANTIZED_INDUCTOR_OPTIONS, TORCHAO_INDUCTOR_OPTIONS

    one_way = {**TORCHAO_INDUCTOR_OPTIONS, "coordinate_descent_check_all_directions": False}
    variants = {"on": dict(TORCHAO_INDUCTOR_OPTIONS), "on, one direction": one_way}
    variants["off"] = dict(QUANTIZED_INDUCTOR_OPTIONS)
    out = compile_variants(args, device, variants)
    if {"on", "off"} <= out["variants"].keys():
        on, no = out["variants"]["on"], out["variants"]["off"]
        out["rel_change_off_vs_on"] = no["rel_change_vs_first"]
        out["forward_saved_per_60_blocks_ms"] = no["forward_ms_per_60_blocks"] - on["forward_ms_per_60_blocks"]
        out["compile_cost_s"] = on["first_call_s"] - no["first_call_s"]
    return out


def run_inductor_options(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """qie's Inductor options for the fp8 blocks against the same with `triton.multi_kernel` (persistent
    reductions up to 16x wider rows, each benchmarked against the looped form at the first call, so the
    rows of the norm + modulate + fp8 quantization kernels can stay in registers) and with `cpp_wrapper`
    (the graph's launch code in C++ instead of Python: host time per call, which sets the pace at 768²),
    with kernel tables (`compile_variants`); `--variants` picks some."""
    from qie.memory.quantize import QUANTIZED_INDUCTOR_OPTIONS

    variants = {"qie": dict(QUANTIZED_INDUCTOR_OPTIONS)}
    variants["multi-kernel"] = {**QUANTIZED_INDUCTOR_OPTIONS, "triton.multi_kernel": 1}
    variants["cpp-wrapper"] = {**QUANTIZED_INDUCTOR_OPTIONS, "cpp_wrapper": True}
    if args.variants:
        unknown = sorted(set(args.variants.split(",")) - variants.keys())
        if unknown:
            raise ValueError(f"--variants {','.join(unknown)}: unknown; use some of {','.join(variants)}")
        variants = {name: options for name, options in variants.items() if name in args.variants.split(",")}
    out = compile_variants(args, device, variants, kernels=True)
    base = out["variants"].get("qie")
    for name, row in out["variants"].items():
        if base is not None and name != "qie":
            row["forward_saved_per_60_blocks_ms"] = base["forward_ms_per_60_blocks"] - row["forward_ms_per_60_blocks"]
            row["host_saved_per_60_blocks_ms"] = base["host_ms_per_60_blocks"] - row["host_ms_per_60_blocks"]
    return out


SECTIONS = {
    "kernels": run_kernels,
    "gelu-warps": run_gelu_warps,
    "ops": run_ops,
    "mlp": run_mlp,
    "attention": run_attention,
    "rope": run_rope,
    "blocks": run_blocks,
    "text": run_text,
    "text-stage": run_text_stage,
    "encode-order": run_encode_order,
    "vae": run_vae,
    "vae-compile": run_vae_compile,
    "coordinate-descent": run_coordinate_descent,
    "inductor-options": run_inductor_options,
}


class Stopped(Exception):
    """The process was asked to stop (SIGTERM, as `timeout` sends): write what was measured and end."""


def _stop(signum, _frame):
    raise Stopped(f"stopped by signal {signum} before the section finished")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fast_levers", description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--layers", type=int, default=4, help="blocks section: full-size blocks (default: 4)")
    parser.add_argument("--text-tokens", type=int, default=230)
    parser.add_argument("--variants", default="", help="inductor-options section: comma list (default: all)")
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"))
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        parser.error(f"--sections {','.join(unknown)}: unknown; use some of {','.join(SECTIONS)}")
    logging.basicConfig(level=logging.INFO, format="[levers] %(message)s")
    device = torch.device("cuda")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    from qie.versions import installed

    meta = {"device": torch.cuda.get_device_name(device), "cuda": torch.version.cuda, "versions": installed()}
    meta["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    payload: dict[str, Any] = {"meta": meta, "sections": {}}
    path = Path(args.out) / f"fast-levers-{args.tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        for name in sections:
            start = time.perf_counter()
            args.partial = {}  # a long section keeps what it measured here as it goes
            stopped = False
            try:
                payload["sections"][name] = SECTIONS[name](args, device)
            except Exception as exc:
                stopped = isinstance(exc, Stopped)
                log.exception("section %s failed", name)
                payload["sections"][name] = {**args.partial, "error": f"{type(exc).__name__}: {exc}"[:1000]}
            payload["sections"][name]["section_s"] = time.perf_counter() - start
            path.write_text(json.dumps(payload, indent=1, default=str))
            torch.cuda.empty_cache()
            if stopped:
                break
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(json.dumps(payload["sections"], indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
