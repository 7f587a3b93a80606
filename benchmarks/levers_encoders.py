"""Lever A/B sections on the encoders and the VAE (`benchmarks.fast_levers`): the text-encode stage, the
order of the two encode stages, the VAE's 2-D convolutions and its compile."""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from benchmarks.levers_timing import (
    cuda_ms,
    empty_inductor_cache,
    kernel_table,
    rel_error,
    wall_ms,
)

if TYPE_CHECKING:
    from qie.core.editor import Editor

log = logging.getLogger("benchmarks.fast_levers")


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
    prompt) on the full-size random Qwen2.5-VL with qie's speed setup: its seconds (also without the language
    model's and without the vision blocks' CUDA graphs), the seconds of its parts (image digests, the ~384²
    resize, the processor, the encoder call), GPU busy time and kernel count, and a cProfile of one call
    (host functions by own and cumulative time)."""
    import gc

    from benchmarks.probes import make_request
    from benchmarks.profiling import GcPauses, host_calls
    from qie.core import encode_cache, stages
    from qie.core.encode_cache import digests_of
    from qie.speed import text_graphs, vision_graphs

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
    vision_graphs.uninstall(pipe.text_encoder)
    out["without_vision_graphs"] = stage_in_context("without the vision blocks' CUDA graphs")
    with torch.inference_mode():
        eager_vision = stages.encode_prompt(pipe, request.prompt, small, device=device).embeds
    out["vision_graphs_equal"] = bool(torch.equal(graphed, eager_vision))
    vision_graphs.install(pipe.text_encoder)
    out["again_with_both"] = stage_in_context("with both again")
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
    out.update(host_calls(stage))
    return out


def run_encode_order(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Both encode stages of an edit (`Editor.encode`, caches off, fast mode: no negative prompt) on the
    full-size random pipeline at 1024² and 768², as an edit runs them (the condition's VAE encode queued,
    then the text encoder's host-side image preparation, no wait between) against the same call with a
    timer that waits for the GPU at the end of each stage, as the timer did before (no overlap), and
    against the text encoder's images resized on the main thread in the text stage (`image_prep`'s
    worker off): median seconds of 7 synchronized calls, and the stage seconds the edit's timer reports.
    Then both sizes again with the VAE compiled (`compile_vae`), and the first call that compiles it."""
    from contextlib import contextmanager, nullcontext
    from unittest import mock

    from benchmarks.probes import make_request
    from qie.core import image_prep, stages
    from qie.speed.compile import compile_vae
    from qie.telemetry import StageTimer

    class WaitingTimer(StageTimer):
        """`StageTimer` that waits for the GPU at the end of each stage."""

        @contextmanager
        def __call__(self, stage: str):
            with super().__call__(stage):
                yield
                torch.cuda.synchronize(self.device)

    def inline(pipe, images):  # the text encoder's images resized on the main thread, in the text stage
        return functools.partial(stages.prompt_images, pipe, images)

    editor = encoders_editor(device)
    out: dict[str, Any] = {"sizes": {}}
    for size in (1024, 768):
        request = make_request(size, 4, False)
        row: dict[str, Any] = {}
        with torch.inference_mode():
            inline_images = functools.partial(mock.patch.object, image_prep, "prompt_images_later", inline)
            variants = (
                ("as an edit", StageTimer, nullcontext),
                ("wait between", WaitingTimer, nullcontext),
                ("prompt images inline", StageTimer, inline_images),
            )
            for name, timer, patched in variants:
                encode = functools.partial(editor.encode, request, uses_cfg=False)
                with patched():
                    row[f"{name}_s"] = wall_ms(lambda e=encode, t=timer: e(t(device)), repeats=7, warm=1) / 1e3
            timer = StageTimer(device)
            editor.encode(request, timer, uses_cfg=False)
            row["timer_s"] = timer.timings
        row["overlap_saved_s"] = row["wait between_s"] - row["as an edit_s"]
        row["worker_saved_s"] = row["prompt images inline_s"] - row["as an edit_s"]
        out["sizes"][str(size)] = row
        log.info("encode order %d²: %s", size, row)
    if device.type == "cuda":  # then with the VAE compiled (`vae_compile`): its encoder in the condition stage
        compile_vae(editor.pipe.vae, "on")
        for size in (1024, 768):
            row, request = out["sizes"][str(size)], make_request(size, 4, False)
            with torch.inference_mode():
                start = time.perf_counter()
                editor.encode(request, StageTimer(device), uses_cfg=False)  # compiles the encoder at this size
                torch.cuda.synchronize()
                row["vae compiled: first call_s"] = time.perf_counter() - start
                encode = functools.partial(editor.encode, request, uses_cfg=False)
                row["vae compiled_s"] = wall_ms(lambda e=encode: e(StageTimer(device)), repeats=7, warm=1) / 1e3
            row["vae_compile_saved_s"] = row["as an edit_s"] - row["vae compiled_s"]
            log.info("encode order %d², VAE compiled: %s", size, row)
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
    from qie.speed.compile import compile_blocks, compile_vae

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
            compile_vae(vae, "on")
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
