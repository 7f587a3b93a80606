"""Lever A/B sections on compiled fp8 transformer blocks (`benchmarks.fast_levers`): RoPE and fp8 attention
variants, and the blocks' compile under sets of Inductor options."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import time
from typing import Any

import torch

from benchmarks.levers_timing import (
    BLOCKS,
    by_category,
    cuda_ms,
    empty_inductor_cache,
    kernel_table,
    rel_error,
    wall_ms,
)

log = logging.getLogger("benchmarks.fast_levers")


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


def compile_variants(
    args: argparse.Namespace, device: torch.device, variants: dict[str, dict[str, Any]], kernels: bool = False
) -> dict[str, Any]:
    """The fp8 blocks compiled once per set of Inductor options in `variants`: a `--layers`-block fp8
    transformer quantized (`quantize_transformer`) and compiled (`compile_blocks`) afresh per variant, each
    from an empty Inductor cache; its first call (the compile), its forward scaled to 60 blocks, the outputs'
    change against the first variant and, with `kernels`, its kernel table (ms per forward of the blocks)."""
    from diffusers import QwenImageTransformer2DModel

    from benchmarks import stream_gain
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
                    row["categories_ms"] = by_category(table)
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


def run_transformer_graphs(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The full-size fp8 transformer (60 blocks, fused MLP quantization, regional compile, FA3) called as an
    edit's fast-mode steps call it, run as it is (`stages.guided_prediction`) against replayed from its CUDA
    graph (`stages.GraphedPrediction` over `qie.speed.transformer_graphs`), at the `--sizes` (default 1024²
    and 768²; the condition at the output's area): milliseconds per call synchronized, the
    host's milliseconds per call, the recording's seconds and memory, and whether the outputs are equal."""
    from types import SimpleNamespace

    from diffusers import QwenImageTransformer2DModel

    from benchmarks.random_model import materialize
    from qie.core import stages
    from qie.memory.quantize import quantize_transformer
    from qie.speed import fa3
    from qie.speed.compile import compile_blocks
    from qie.speed.transformer_graphs import TransformerGraphs

    model = materialize(lambda: QwenImageTransformer2DModel(num_layers=BLOCKS), device, torch.bfloat16, 3)
    quantize_transformer(model, device, fuse_mlp=True)
    if not fa3.install(device):
        return {"skipped": "needs a Hopper GPU and fa3-fwd"}
    compile_blocks(model)
    pipe = SimpleNamespace(transformer=model)
    out: dict[str, Any] = args.partial
    out.update({"layers": BLOCKS, "text_tokens": args.text_tokens, "sizes": {}})
    gen = torch.Generator(device=device).manual_seed(0)
    try:
        for size in (int(size) for size in args.sizes.split(",")):
            side = size // 16
            hidden = torch.randn(1, 2 * side * side, 64, device=device, dtype=torch.bfloat16, generator=gen)
            text = torch.randn(1, args.text_tokens, 3584, device=device, dtype=torch.bfloat16, generator=gen)
            prompt = stages.PromptEmbeds(text, None)
            timestep = torch.full((1,), 0.5, device=device, dtype=torch.bfloat16)
            img_shapes = [[(1, side, side), (1, side, side)]]
            call = (pipe, hidden, timestep, prompt, None, img_shapes, 1.0)
            graphs = TransformerGraphs(model)
            row: dict[str, Any] = {}
            with torch.inference_mode():
                first = stages.GraphedPrediction(graphs, graphs.start_edit(), ("fast", "off"))
                as_is = first(*call)  # an edit's first call of these shapes (it also compiles at the first size)
                later = stages.GraphedPrediction(graphs, graphs.start_edit(), ("fast", "off"))
                torch.cuda.synchronize()
                reserved = torch.cuda.memory_reserved(device)
                start = time.perf_counter()
                replayed = later(*call)  # the next edit's: recorded, then replayed
                torch.cuda.synchronize()
                row["record_and_replay_s"] = time.perf_counter() - start
                row["pool_gib"] = (torch.cuda.memory_reserved(device) - reserved) / 2**30
                row["recorded"] = graphs.recorded
                row["equal"] = torch.equal(as_is, replayed)
                row["max_abs_diff"] = (as_is.float() - replayed.float()).abs().max().item()
                for name, fn in (
                    ("as it is", functools.partial(stages.guided_prediction, *call)),
                    ("replayed", functools.partial(later, *call)),
                ):
                    row[f"{name}_ms"] = wall_ms(fn, repeats=10)
                    row[f"{name}_host_ms"] = wall_ms(fn, repeats=10, until_done=False)
            row["saved_ms"] = row["as it is_ms"] - row["replayed_ms"]
            out["sizes"][str(size)] = row
            log.info("transformer graphs %d²: %s", size, row)
            del graphs, later, first, fn
            torch.cuda.empty_cache()
    finally:
        fa3.uninstall()
    return out


def run_prologue(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The full-size fp8 transformer (60 blocks, fused MLP quantization, regional compile, FA3) with its
    blocks' LayerNorm + modulation + fp8 quantization as Inductor fuses it ("off") and as one Triton op per
    stream and norm handing fp8 rows to the projections (`qie.speed.block_prologue`, "on"), at the `--sizes`:
    CUDA milliseconds per forward, as it is and replayed from a CUDA graph (an edit's steps), kernel table
    and categories, error against the bf16 weights' output."""
    from qie.speed import block_prologue

    def variant(on: bool):
        def toggle(model):
            (block_prologue.install if on else block_prologue.uninstall)(model)
            return contextlib.nullcontext()

        return toggle

    return transformer_ab(
        args, device, {"off": variant(False), "on": variant(True), "off, again": variant(False)}, "prologue"
    )


def run_values(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The same transformer under fp8 attention (`fa3.fp8_attention()`, a request's `attention_quant="fp8"`)
    with the values' join and fp8 cast as Inductor compiles `quantize_heads` of the concatenation ("off")
    and as the two-pass Triton op (`qie.speed.fp8_values`, "on"), then Inductor's again: the same tables."""
    from qie.speed import fa3, fp8_values

    @contextlib.contextmanager
    def fp8(unfused: bool):
        with fa3.fp8_attention(), fp8_values.unfused() if unfused else contextlib.nullcontext():
            yield

    variants = {"off": lambda m: fp8(True), "on": lambda m: fp8(False), "off, again": lambda m: fp8(True)}
    return transformer_ab(args, device, variants, "values")


def transformer_ab(args: argparse.Namespace, device: torch.device, variants: dict, label: str) -> dict[str, Any]:
    """The full-size fp8 transformer (`BLOCKS` blocks, fused MLP quantization, regional compile, FA3) run under
    each of `variants` (name -> `variant(model)`, a context manager the forwards run in), traced again for
    each, at the `--sizes`: CUDA milliseconds per forward (`forward_ms`), replayed from a CUDA graph as an
    edit's steps replay it (`replayed_ms`), first call, kernel table and categories, error against the bf16
    weights' output; and the "on" variant's savings against "off" and the drift between two "off" runs."""
    from diffusers import QwenImageTransformer2DModel

    from benchmarks import stream_gain
    from benchmarks.random_model import materialize
    from qie.memory.quantize import quantize_transformer
    from qie.speed import block_prologue, fa3
    from qie.speed.compile import compile_blocks

    out: dict[str, Any] = args.partial
    model = materialize(lambda: QwenImageTransformer2DModel(num_layers=BLOCKS), device, torch.bfloat16, 3)
    sizes = [int(size) for size in args.sizes.split(",")]
    calls = {size: stream_gain.inputs(device, False, args.text_tokens, size) for size in sizes}
    with torch.inference_mode():
        references = {size: model(**call)[0] for size, call in calls.items()}
    quantize_transformer(model, device, fuse_mlp=True)
    if not fa3.install(device):
        return {"skipped": "needs a Hopper GPU and fa3-fwd"}
    out.update({"layers": BLOCKS, "text_tokens": args.text_tokens, "sizes": {}})
    try:
        compile_blocks(model)
        out["installed_blocks"] = sum(isinstance(b, block_prologue.Fp8PrologueBlock) for b in model.transformer_blocks)
        for name, variant in variants.items():
            torch._dynamo.reset()
            with variant(model):
                for size, call in calls.items():
                    out["sizes"].setdefault(str(size), {})[name] = row = _forward_row(model, call, references[size])
                    log.info(
                        "%s %s %d²: %.2f ms, replayed %.2f ms, error %.4f",
                        label, name, size, row["forward_ms"], row["replayed_ms"], row["rel_error_vs_bf16_weights"],
                    )  # fmt: skip
        for rows in out["sizes"].values():
            if {"off", "on"} <= rows.keys():
                rows["saved_ms"] = rows["off"]["forward_ms"] - rows["on"]["forward_ms"]
                rows["replayed_saved_ms"] = rows["off"]["replayed_ms"] - rows["on"]["replayed_ms"]
            if {"off", "off, again"} <= rows.keys():
                rows["replayed_drift_ms"] = rows["off, again"]["replayed_ms"] - rows["off"]["replayed_ms"]
    finally:
        fa3.uninstall()
    return out


def _forward_row(model: torch.nn.Module, call: dict[str, Any], reference: torch.Tensor) -> dict[str, Any]:
    """One variant's forward at one size: first call, CUDA ms, kernel table, replayed ms, error."""
    with torch.inference_mode():
        start = time.perf_counter()
        result = model(**call)[0]
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        ms = cuda_ms(lambda: model(**call))
        table = kernel_table(lambda: model(**call), repeats=3, top=40)
        graph = torch.cuda.CUDAGraph()  # as an edit's steps replay it (`qie.speed.transformer_graphs`)
        with torch.cuda.graph(graph):
            model(**call)
        replayed = cuda_ms(graph.replay, repeats=20)
        del graph
    return {
        "forward_ms": ms,
        "replayed_ms": replayed,
        "first_call_s": first,
        "rel_error_vs_bf16_weights": rel_error(result, reference),
        "categories_ms": by_category(table),
        "kernels_ms": table,
    }


def run_prologue_kernel(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """`qie_norm_modulate_quantize` alone at 1024²'s 8192 image rows, per-sample modulation, as the norm
    pass and as the gated sum + norm pass, for 1, 2, 4 and 8 rows per program under 4, 8 and 16 warps:
    the kernel's own milliseconds per call (profiled: an eager launch costs more host time than the
    kernel runs), and the pair with the smallest sum of the two passes. Memory floors at 4.8 TB/s:
    3 bytes per element, 7 with the sum."""
    from qie.memory import norm_quantize
    from qie.speed import block_prologue

    x, y = (torch.randn(1, 8192, 3072, device=device, dtype=torch.bfloat16) for _ in range(2))
    params = torch.randn(1, 3 * 3072, device=device, dtype=torch.bfloat16)
    shift, scale, gate = (p.expand_as(x) for p in block_prologue.modulation(params))

    def kernel_ms(fn) -> float:
        table = kernel_table(fn, repeats=20, top=5)
        return sum(ms for name, ms in table.items() if "qie_norm_modulate_quantize" in name)

    timings: dict[str, dict[str, float]] = {}
    for rows in (1, 2, 4, 8):
        for warps in (4, 8, 16):
            timings[f"{rows} rows, {warps} warps"] = {
                "norm_ms": kernel_ms(
                    lambda r=rows, w=warps: norm_quantize._launch(x, shift, scale, 1e-6, rows=r, num_warps=w)
                ),
                "sum_norm_ms": kernel_ms(
                    lambda r=rows, w=warps: norm_quantize._launch(x, shift, scale, 1e-6, gate, y, rows=r, num_warps=w)
                ),
            }
    best = min(timings, key=lambda k: timings[k]["norm_ms"] + timings[k]["sum_norm_ms"])
    kernels = norm_quantize._triton_kernels()
    return {
        "timings": timings,
        "best": best,
        "default": f"{kernels.ROWS} rows, {kernels.ROW_WARPS} warps",
        "floor_norm_ms": x.numel() * 3 / 4.8e12 * 1e3,
        "floor_sum_norm_ms": x.numel() * 7 / 4.8e12 * 1e3,
    }


def run_values_kernel(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """`qie.speed.fp8_values`'s two kernels alone at 1024²'s joint values (`--text-tokens` + 8192 tokens,
    24 heads of 128), for 16 to 128 tokens per program under 2, 4 and 8 warps: each kernel's profiled
    milliseconds per call and the fastest setting. Memory floors at 4.8 TB/s: 2 bytes per element for the
    maxima, 3 for the cast."""
    from qie.speed import fp8_values

    txt = torch.randn(1, args.text_tokens, 24, 128, device=device, dtype=torch.bfloat16)
    img = torch.randn(1, 8192, 24, 128, device=device, dtype=torch.bfloat16)

    def kernel_ms(tokens: int, warps: int) -> dict[str, float]:
        table = kernel_table(lambda: fp8_values._launch(txt, img, tokens, warps), repeats=20, top=8)
        return {kernel: sum(ms for name, ms in table.items() if kernel in name) for kernel in ("amax", "fp8")}

    timings = {f"{t} tokens, {w} warps": kernel_ms(t, w) for t in (16, 32, 64, 128) for w in (2, 4, 8)}
    best = min(timings, key=lambda k: sum(timings[k].values()))
    elements = txt.numel() + img.numel()
    return {
        "timings": timings,
        "best": best,
        "default": f"{fp8_values._triton_kernels().TOKENS} tokens, {fp8_values._triton_kernels().WARPS} warps",
        "floor_amax_ms": elements * 2 / 4.8e12 * 1e3,
        "floor_cast_ms": elements * 3 / 4.8e12 * 1e3,
    }
