"""Lever A/B sections on single kernels at the real shapes (`benchmarks.fast_levers`): the GELU + fp8 row
kernels, the Triton ops' host cost, one block MLP, attention, the q/k prologue."""

from __future__ import annotations

import argparse
import functools
import logging
import time
from typing import Any

import torch

from benchmarks.levers_timing import (
    BLOCKS,
    IMAGE_TOKENS,
    cuda_ms,
    empty_inductor_cache,
    graph_ms,
    kernel_table,
    rel_error,
    wall_ms,
)

log = logging.getLogger("benchmarks.fast_levers")


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


def run_gelu_graph(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The GELU + fp8 row kernel against its candidate forms (`benchmarks.gelu_variants`), each timed from a
    CUDA graph (no launch cost) at the text stream's and 1024²'s image rows, checked equal to it; and the
    text and image rows in one launch against two."""
    import triton
    from torch._library.triton import set_wrap_triton_enabled

    from benchmarks import gelu_variants as variants
    from qie.memory.fp8_matmul import FP8, FP8_MAX, MIN_SCALE
    from qie.memory.fp8_mlp import _launch

    sms = torch.cuda.get_device_properties(device).multi_processor_count
    consts = {"FP8_MAX_": FP8_MAX, "MIN_SCALE_": MIN_SCALE, "CHUNK": 4096, "CHUNKS": 3}

    def buffers(rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = torch.randn(rows, 12288, device=device, dtype=torch.bfloat16) * 2
        return h, torch.empty(rows, 12288, dtype=FP8, device=device), torch.empty(rows, 1, device=device)

    def single(kernel, grid, h, q, s, **extra):
        def launch():
            kernel[grid](h, q, s, h.shape[0], h.stride(0), q.stride(0), **consts, **extra)

        return launch

    out: dict[str, Any] = {"cols": 12288, "ms": {}, "equal": {}}
    with torch.inference_mode(), set_wrap_triton_enabled(False):
        for rows in (args.text_tokens, IMAGE_TOKENS):
            h, q, s = buffers(rows)
            ref_q, ref_s = _launch(h)
            ms = out["ms"][str(rows)] = {"package": graph_ms(lambda h=h: _launch(h))}
            candidates = {}
            for warps in (8, 16, 32):
                for per in (1, 2, 4):
                    grid = (triton.cdiv(rows, per),)
                    candidates[f"multi rows={per} warps={warps}"] = single(
                        variants.gelu_rows_multi, grid, h, q, s, ROWS=per, num_warps=warps
                    )
                for waves in (1, 2, 4):
                    for stages in (1, 2, 3):
                        grid = (min(rows, waves * sms),)
                        candidates[f"persistent waves={waves} stages={stages} warps={warps}"] = single(
                            variants.gelu_rows_persistent, grid, h, q, s, STAGES=stages, num_warps=warps
                        )
            for name, launch in candidates.items():
                try:
                    q.zero_(), s.zero_()
                    launch()
                    out["equal"][f"{name} {rows}"] = torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and (
                        torch.equal(s, ref_s)
                    )
                    ms[name] = graph_ms(launch)
                except Exception as exc:  # noqa: BLE001  (a form that does not compile is a result too)
                    ms[name] = f"{type(exc).__name__}: {exc}"[:300]
            best = min((k for k, v in ms.items() if isinstance(v, float)), key=ms.get)
            out[f"best {rows}"] = {"form": best, "ms": ms[best], "package_ms": ms["package"]}
            log.info("gelu graph %d rows: best %s %.4f ms (package %.4f)", rows, best, ms[best], ms["package"])
        (a, qa, sa), (b, qb, sb) = buffers(args.text_tokens), buffers(IMAGE_TOKENS)
        joint_grid = (a.shape[0] + b.shape[0],)

        def joint(warps: int):
            def launch():
                variants.gelu_rows_joint[joint_grid](
                    a, qa, sa, a.shape[0], b, qb, sb, a.stride(0), qa.stride(0), b.stride(0), qb.stride(0),
                    **consts, num_warps=warps,
                )  # fmt: skip

            return launch

        out["two launches ms"] = graph_ms(lambda: (_launch(a), _launch(b)))
        for warps in (8, 16, 32):
            out[f"joint warps={warps} ms"] = graph_ms(joint(warps))
        joint(16)()
        (ra, rsa), (rb, rsb) = _launch(a), _launch(b)
        out["joint equal"] = (
            all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in ((qa, ra), (qb, rb)))
            and torch.equal(sa, rsa)
            and torch.equal(sb, rsb)
        )
    return out


SMALL_GEMMS = {  # (rows, K, N): the modulation's one row, the text stream's projections, batched CFG's text
    "modulation": (1, 3072, 18432),
    "text qkv/out": (234, 3072, 3072),
    "text fc1": (234, 3072, 12288),
    "text fc2": (234, 12288, 3072),
    "cfg text qkv/out": (468, 3072, 3072),
    "cfg text fc2": (468, 12288, 3072),
}


def run_small_gemm(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """fp8 GEMMs of few rows: cuBLAS's `torch._scaled_mm` against the Triton tile kernel
    (`qie.memory.few_rows_gemm_kernels`) at several tile shapes and, for one row, a GEMV kernel
    (`benchmarks.gemm_variants`), each timed from a CUDA graph, with the weight-read floor and the
    largest difference to cuBLAS. (h200-ce ran this before `scaled_mm_rows` routed few rows to the tile
    kernel: its "cublas_us" were cuBLAS's.)"""
    from torch._library.triton import set_wrap_triton_enabled

    from benchmarks.floors import peaks_for

    bandwidth = peaks_for(torch.cuda.get_device_name(device)).hbm_bytes_s
    out: dict[str, Any] = {}
    with torch.inference_mode(), set_wrap_triton_enabled(False):
        for label, shape in SMALL_GEMMS.items():
            out[label] = _small_gemm(*shape, device, bandwidth)
            best = out[label].get("best", {})
            log.info("small gemm %s: cuBLAS %.1f us, best %s", label, out[label]["cublas_us"], best)
    return out


def _small_gemm(m: int, k: int, n: int, device: torch.device, bandwidth: float) -> dict[str, Any]:
    """One `SMALL_GEMMS` shape of `run_small_gemm`."""
    import triton

    from benchmarks import gemm_variants as variants
    from qie.memory import few_rows_gemm_kernels
    from qie.memory.fp8_matmul import cublas_rows, quantize_rows

    xq, xs = quantize_rows(torch.randn(m, k, device=device, dtype=torch.bfloat16))
    wq, ws = quantize_rows(torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5)
    bias = torch.randn(n, device=device, dtype=torch.bfloat16)
    ref = cublas_rows(xq, xs, wq, ws, bias, torch.bfloat16)
    y = torch.empty_like(ref)
    forms: dict[str, Any] = {}

    def timed(name: str, launch) -> None:
        try:
            launch()
            diff = (y.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
            forms[name] = [round(graph_ms(launch) * 1e3, 2), diff]
        except Exception as exc:  # noqa: BLE001  (a form that does not compile is a result too)
            forms[name] = f"{type(exc).__name__}: {exc}"[:200]

    def tile(bm: int, bn: int, bk: int, stages: int):
        grid = (n // bn, triton.cdiv(m, bm))
        return lambda: few_rows_gemm_kernels.qie_fp8_rows_gemm[grid](
            xq, xs, wq, ws, bias, y, m, k, xq.stride(0), xs.stride(0), wq.stride(0), ws.stride(0), y.stride(0),
            HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, num_warps=4,
        )  # fmt: skip

    def gemv(bn: int, bk: int):
        return lambda: variants.fp8_rows_gemv[(n // bn,)](
            xq, xs, wq, ws, bias, y, k, wq.stride(0), HAS_BIAS=True, BLOCK_N=bn, BLOCK_K=bk, STAGES=3, num_warps=4
        )  # fmt: skip

    for bm in (16, 32, 64) if m > 1 else (16,):
        for bn in (32, 64, 128):
            for bk in (128, 256):
                for stages in (3, 5):
                    timed(f"tile m{bm} n{bn} k{bk} s{stages}", tile(bm, bn, bk, stages))
    if m == 1:
        for bn in (16, 32, 64):
            for bk in (128, 256, 512):
                timed(f"gemv n{bn} k{bk}", gemv(bn, bk))
    row: dict[str, Any] = {
        "shape": [m, k, n],
        "floor_us": round((wq.numel() + xq.numel() + ref.numel() * 2) / bandwidth * 1e6, 2),
        "cublas_us": round(graph_ms(lambda: cublas_rows(xq, xs, wq, ws, bias, torch.bfloat16)) * 1e3, 2),
        "triton_us": forms,
    }
    times = {name: v[0] for name, v in forms.items() if isinstance(v, list)}
    if times:
        best = min(times, key=times.get)
        row["best"] = {"form": best, "us": times[best], "max_rel_diff": forms[best][1]}
    return row
