"""The benchmark's fast-path sections: how close an edit gets to the floor, end to end.

Sections (``python -m qie bench --sections ...``), each on fresh full-size random weights:
  fast      fast mode (a random Lightning LoRA of the real shapes, fused) on the fastest plan
            (resident-fp8 + regional compile with ``--compile-mode``): 8 and 4 steps end to end at
            every ``--sizes`` (the condition area left to auto: the output's area under 0.6 MP); at the
            first size, the forward's time by kernel category next to each category's floor, and the
            host syncs of one edit (CUDA's sync debug mode); each row's denoise seconds and the seconds
            no stage covers; at every size a cProfile of the fastest 8-step edit's host and where the GPU
            idled in it, by stage and longest gaps (``profile["gpu_idle"]``). With ``--attention-quant``,
            the rows again at every size with that request option (e.g. FA3's fp8 attention)
  quality   a 40-step CFG edit on the fastest plan, measured end to end (not derived), with the
            forward's kernel-category profile
  compile   the regional compile's modes (``--compile-modes``): warm-up seconds, first-edit
            seconds, step times and peak memory of each
  encoders  around the transformer: the VAE compiled (plain, channels-last) and the text
            encoder stored in fp8: their stage seconds, memory and PSNR against the plain pipeline
  restart   a first edit in a new process, twice: with empty compile caches, then with the caches
            the first process left on disk (the quality section at 2 CFG steps, in a child process)

End-to-end times are medians of edits without per-step synchronization (the loop runs as in
service), after a first edit (`e2e_s["first_edit"]`: it compiles what is compiled); step times
come from one more edit with a synchronized timestamp per step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from benchmarks.probes import Probe, Row, probe_qie, time_e2e
from benchmarks.profiling import gpu_idle, host_calls
from qie.core.tolerances import difference

AUTO = {"condition_area": None}  # what a user gets: the output's area under 0.6 MP


def request_options(bench: Any) -> dict[str, Any]:
    """The fast and quality sections' request options: the automatic condition area, `--attention-quant`."""
    return {**AUTO, "attention_quant": getattr(bench.args, "attention_quant", None) or "off"}


def compile_mode(bench: Any) -> str:
    return getattr(bench.args, "compile_mode", None) or "default"


def host_syncs(editor, request_size: int, steps: int, **options: Any) -> dict[str, int]:
    """Where one edit synchronized the host with the GPU: {"file:line": count} (CUDA only, else {})."""
    if not torch.cuda.is_available():
        return {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            probe_qie(editor, request_size, steps, False, stamp_steps=False, **options)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    places = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "ynchroniz" in str(w.message))
    return dict(places.most_common(20))


def fastest_editor(
    bench: Any,
    *,
    lora_steps: int | None = None,
    fixes: bool = True,
    plan: str | None = None,
    budget_gib: float | None = None,
):
    """A fresh pipeline on the fastest plan (or `plan` within `budget_gib`), compiled (the VAE
    too with `--vae-compile`), with a random Lightning LoRA fused when `lora_steps`.

    `fixes=False` turns qie's prompt fix off, for images comparable with the stock reference.
    """
    from qie.core.load_options import auto_vae_compile
    from qie.core.speed_setup import setup_speed
    from qie.speed.compile import compile_blocks, compile_vae
    from qie.speed.fast_mode import random_lightning_lora

    pipe = bench.fresh_pipe()
    attention = getattr(bench.args, "attention", None) or "auto"
    with tempfile.TemporaryDirectory() as tmp:
        lora = None
        if lora_steps:
            lora = str(random_lightning_lora(pipe.transformer, Path(tmp) / "lightning.safetensors", dtype=pipe.dtype))
        speed = setup_speed(
            pipe, bench.device, pipe.dtype, attention_backend=attention, fast_lora=lora, fast_steps=lora_steps or 8
        )
    editor = bench.editor(pipe, plan or bench.fast_plan(), budget_gib=budget_gib, fixes=fixes)
    editor.speed = speed
    compiled = bench.device.type == "cuda" and compile_blocks(pipe.transformer, mode=compile_mode(bench))
    vae_mode = getattr(bench.args, "vae_compile", None) or "auto"
    if vae_mode == "auto":  # as `Editor.load` does: with the transformer, on the resident plans
        vae_mode = auto_vae_compile(vae_mode, editor.plan.name) if compiled else "off"
    compile_vae(pipe.vae, vae_mode)
    editor.compiled, editor.compile_stats = compiled, {"mode": compile_mode(bench)}
    editor.enable_graphs(getattr(bench.args, "transformer_graphs", None) or "auto")
    return editor, compiled


def run_fast_under_budget(bench: Any, budget: float, size: int = 1024) -> None:
    """Fast mode (8 and 4 steps, fused random Lightning LoRA) on the plan the planner picks for `budget` GiB,
    end to end at `size`² with the GPU memory capped at the budget (the budgets section calls it for <= 10 GiB)."""
    bench.check_time(f"fast mode @ {budget:g} GiB")
    torch.cuda.set_per_process_memory_fraction(1.0)  # the pipeline is built on the GPU before the plan moves it
    plan = "stream"  # what the planner picks at 10 GiB and below (checked by tests/memory/test_plans.py)
    editor, compiled = fastest_editor(bench, lora_steps=8, plan=plan, budget_gib=budget)
    bench.cap_memory(budget)
    try:
        for steps in (8, 4):
            editor.speed.fast = dataclasses.replace(editor.speed.fast, steps=steps)
            probe = time_e2e(editor, size, steps, False, **request_options(bench))
            if probe.steps_run != steps:
                raise RuntimeError(f"fast mode ran {probe.steps_run} steps, {steps} asked")
            label = f"fast mode {steps} steps @ {budget:g} GiB ({plan}{', compiled' if compiled else ''})"
            row = stage_row(label, size, plan, probe)
            row.e2e_s = {f"fast_{steps}": probe.e2e_s, "first_edit": probe.first_e2e_s}
            bench.add(row)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        del editor


def plan_label(bench: Any, compiled: bool, attention: str, quant: str | None = None) -> str:
    compiled_part = f" + compile ({compile_mode(bench)})" if compiled else ""
    quant = quant or request_options(bench)["attention_quant"]
    quant_part = f" ({quant})" if quant != "off" else ""
    return f"{bench.fast_plan()}{compiled_part}, {attention}{quant_part} attention"


def run_fast(bench: Any) -> None:
    """Fast mode, 8 and 4 steps without CFG, end to end at every size; at the first size the profile.

    The 4- and 8-step LoRAs have the same shapes, so once fused they cost the same per step: one
    build serves both step counts (the loaded LoRA is told it is the 4-step one for those rows).
    With `--attention-quant`, a second pass repeats the rows at every size with that request option.
    """
    bench.check_time("fast")
    references = fast_references(bench, bench.args.sizes[0]) if getattr(bench.args, "fast_psnr", True) else {}
    editor, compiled = fastest_editor(bench, lora_steps=8)
    quant = request_options(bench)["attention_quant"]
    passes = [("off", bench.args.sizes)] + ([(quant, bench.args.sizes)] if quant != "off" else [])
    for mode, sizes in passes:
        options = {**AUTO, "attention_quant": mode}
        label = plan_label(bench, compiled, editor.speed.attention_backend, mode)
        first = True  # the pass's first edit compiles (its attention variant is a graph of its own)
        for steps in (8, 4):
            editor.speed.fast = dataclasses.replace(editor.speed.fast, steps=steps)
            for size in sizes:
                bench.check_time(f"fast {steps} @ {size} ({mode})")
                probe = time_e2e(editor, size, steps, False, **options)
                if probe.steps_run != steps:
                    raise RuntimeError(f"fast mode ran {probe.steps_run} steps, {steps} asked")
                row = stage_row(f"fast mode {steps} steps (fused LoRA) + {label}", size, bench.fast_plan(), probe)
                row.e2e_s = {f"fast_{steps}": probe.e2e_s, **outside_stages(probe)}
                if (mode, steps) == (passes[-1][0], 8):  # the fastest 8-step edits: host time, GPU idle
                    edit = functools.partial(probe_qie, editor, size, 8, False, stamp_steps=False, **options)
                    row.profile["host_edit"] = host_calls(edit)
                    row.profile["gpu_idle"] = gpu_idle(edit)
                if size == sizes[0] and steps in references:
                    diff = difference(probe.image, references[steps])
                    row.psnr_vs_ref, row.max_abs_vs_ref = diff.psnr, diff.max_abs
                if first:  # and where its time went: compiles happen in denoise (blocks) and decode (VAE)
                    row.e2e_s["first_edit"], first = probe.first_e2e_s, False
                    row.e2e_s.update({f"first_edit_{k}": v for k, v in probe.first_timings.items()})
                row.notes += [n for n in probe.notes if n.startswith(("condition_area", "attention_quant"))]
                row.notes.append(gc_note(probe))
                if editor.graphs is not None:
                    row.notes.append(graphs_note(editor.graphs))
                stock = bench.stock.get(size)
                if stock and stock.e2e_8_nocfg_s:
                    row.notes.append(f"stock 8 steps without CFG: {stock.e2e_8_nocfg_s:.2f}s")
                bench.add(row)
                if steps == 4 and size == sizes[0]:
                    with editor.speed.quantized_attention(editor.pipe, mode):  # the profile replays the row's attention
                        bench.profile(
                            row,
                            editor.pipe.transformer,
                            lambda s=size, o=options: probe_qie(editor, s, 4, False, **o),
                            editor,
                        )
                    row.profile["host_syncs"] = host_syncs(editor, size, steps, **options)
                    bench.save()


def fast_references(bench: Any, size: int) -> dict[int, Any]:
    """The fast section's 8- and 4-step edits at `size` on a fresh pipeline of the same weights, resident in
    the bench's precision (bf16 on a GPU) and eager, with the same random Lightning LoRA fused: the images
    the fast rows' PSNR is measured against (`psnr_vs_ref`). The pipeline is freed before the section's own."""
    from qie.core.registry import pipeline_variant, variant_spec
    from qie.core.speed_setup import SpeedSetup
    from qie.speed.fast_mode import load_fast_mode, random_lightning_lora

    bench.check_time("fast references")
    pipe = bench.fresh_pipe()
    editor = bench.editor(pipe, "resident")
    with tempfile.TemporaryDirectory() as tmp:
        lora = random_lightning_lora(pipe.transformer, Path(tmp) / "lightning.safetensors", dtype=pipe.dtype)
        spec = variant_spec(pipeline_variant(pipe)).lightning
        fast = load_fast_mode(pipe, str(lora), lightning=spec, steps=8, fuse=True)
    editor.speed = SpeedSetup(fast=fast, fast_unavailable=None)
    images = {}
    for steps in (8, 4):  # one fused LoRA serves both step counts, as in the section
        editor.speed.fast = dataclasses.replace(fast, steps=steps)
        images[steps] = probe_qie(editor, size, steps, False, stamp_steps=False, **AUTO).image
    del editor, pipe, fast
    return images


def outside_stages(probe: Probe) -> dict[str, float]:
    """The median edit's denoise seconds, and the seconds of its end-to-end time that no stage covers."""
    if not probe.timings:
        return {}
    return {"denoise": probe.timings.get("denoise", 0.0), "outside_stages": probe.e2e_s - sum(probe.timings.values())}


def graphs_note(graphs: Any) -> str:
    """What the transformer's CUDA graphs did so far (`qie.speed.transformer_graphs`)."""
    state = f"off ({graphs.disabled})" if graphs.disabled else f"{len(graphs.graphs)} kept"
    if graphs.skipped and not graphs.disabled:
        state += f", the last edit did not replay: {graphs.skipped}"
    return f"transformer CUDA graphs: {graphs.recorded} recorded, {state}"


def gc_note(probe: Probe) -> str:
    """The garbage collector's pauses in the median edit: seconds and collections per generation."""
    counts = ", ".join(f"gen{g} {n}" for g, n in sorted(probe.gc_collections.items()))
    return f"gc pauses per edit: {probe.gc_s:.3f}s ({counts})"


def stage_row(name: str, size: int, plan: str, probe: Probe, *, cfg: bool = False, **fields: Any) -> Row:
    """A row with a probe's step seconds (CFG or not), peak memory and stage seconds, plus `fields`."""
    return Row(
        name=name,
        size=size,
        plan=plan,
        step_s_nocfg=None if cfg else probe.step_s,
        step_s_cfg=probe.step_s if cfg else None,
        peak_gib=probe.peak_gib,
        stage_peaks_gib=probe.stage_peaks_gib,
        text_encode_s=probe.timings.get("text_encode"),
        condition_encode_s=probe.timings.get("condition_encode"),
        decode_s=probe.timings.get("decode"),
        **fields,
    )


def run_quality(bench: Any) -> None:
    """A 40-step CFG edit on the fastest plan, measured end to end, at the first size; and its profile."""
    bench.check_time("quality")
    editor, compiled = fastest_editor(bench, fixes=False)
    size = bench.args.sizes[0]
    steps = getattr(bench.args, "quality_steps", 40)
    probe = time_e2e(editor, size, steps, True, repeats=1, **request_options(bench))
    row = stage_row(
        f"quality {steps} steps CFG + {plan_label(bench, compiled, editor.speed.attention_backend)}",
        size,
        bench.fast_plan(),
        probe,
        cfg=True,
        e2e_40_cfg_s=probe.e2e_s if steps == 40 else None,
        e2e_40_cfg_measured=steps == 40,
        e2e_s={f"quality_{steps}_cfg": probe.e2e_s, "first_edit": probe.first_e2e_s},
        notes=["without step caching"],
    )
    if size in bench.reference:  # same weights and seed as the stock reference (probe_steps CFG steps)
        quant = request_options(bench)["attention_quant"]  # the reference's condition area, the row's attention
        ref_probe = probe_qie(editor, size, bench.args.probe_steps, True, condition_area="model", attention_quant=quant)
        diff = difference(ref_probe.image, bench.reference[size])
        row.psnr_vs_ref, row.max_abs_vs_ref = diff.psnr, diff.max_abs
    bench.add(row)
    options = request_options(bench)
    with editor.speed.quantized_attention(editor.pipe, options["attention_quant"]):  # as the row's edit ran
        bench.profile(row, editor.pipe.transformer, lambda: probe_qie(editor, size, 2, True, **options), editor)


def run_compile_modes(bench: Any) -> None:
    """Each `--compile-modes` mode on the fastest plan: warm-up, first edit, steps, peak memory."""
    from qie.speed.compile import inductor_options, uncompile_blocks

    modes = [m for m in str(getattr(bench.args, "compile_modes", "default")).split(",") if m]
    size = bench.args.sizes[0]
    for mode in modes:
        bench.check_time(f"compile mode {mode}")
        pipe = bench.fresh_pipe()
        editor = bench.editor(pipe, bench.fast_plan())
        start = time.perf_counter()
        if not editor.enable_compile(warm_up_size=size, mode=mode):
            raise RuntimeError(f"compile mode {mode}: compile or its warm-up failed (see the log)")
        warm_up = time.perf_counter() - start
        first = probe_qie(editor, size, bench.args.probe_steps, True, stamp_steps=False)
        name = f"compile mode {mode} + {bench.fast_plan()}"
        row = bench.measure(name, bench.fast_plan(), size, _runner(editor), started=True)  # after minutes of warm-up
        row.e2e_s = {"compile_warm_up": warm_up, "first_edit": first.e2e_s}
        row.notes.append(f"inductor options {inductor_options(pipe.transformer.transformer_blocks[0])}")
        row.notes.append(f"first edit: {bench.args.probe_steps} CFG steps right after the warm-up")
        bench.save()
        uncompile_blocks(pipe.transformer)  # the next mode compiles afresh; CUDA-graph pools are freed
        del editor, pipe


def _runner(editor):
    return lambda s, n, c: probe_qie(editor, s, n, c)


def run_encoders(bench: Any) -> None:
    """VAE compile (plain, channels-last) and fp8 text-encoder storage, on the plain resident plan.

    Each VAE variant gets a fresh pipeline (same seed and weights): plain, VAE compiled, VAE
    compiled channels-last; the text encoder in fp8 is then applied to the last one. Each row's
    PSNR is against the plain pipeline's image (same weights and seed); the VAE variants need CUDA.
    """
    from qie.memory.quantize import store_text_encoder_fp8
    from qie.speed.compile import compile_vae

    size = bench.args.sizes[0]
    pipe = bench.fresh_pipe()
    editor = bench.editor(pipe, "resident")
    plain = encoder_row(bench, editor, "encoders: plain", size, None)
    variants = [("on", "VAE compiled"), ("channels-last", "VAE compiled, channels-last")]
    for mode, label in variants if bench.device.type == "cuda" else []:
        bench.check_time(label)
        # A fresh pipeline (same seed, same weights) per variant: a compiled decoder asserts the weight
        # layout it was traced with, so channels-last applied over the plain compile fails.
        del editor, pipe
        pipe = bench.fresh_pipe()
        editor = bench.editor(pipe, "resident")
        compile_vae(pipe.vae, mode)
        encoder_row(bench, editor, f"encoders: {label}", size, plain)
    bench.check_time("text encoder fp8")
    before = bench.resident_gib()
    store_text_encoder_fp8(pipe.text_encoder, pipe.dtype)
    after = bench.resident_gib()
    freed = None if before is None or after is None else before - after
    encoder_row(bench, editor, "encoders: text encoder fp8 storage", size, plain, freed_gib=freed)


def encoder_row(
    bench: Any,
    editor,
    name: str,
    size: int,
    plain: Probe | None,
    freed_gib: float | None = None,
    plan: str = "resident",
) -> Probe:
    """Median text-encode, condition-encode and decode seconds of 3 edits (2 steps, no CFG) after a
    warm-up, PSNR against the `plain` probe; returns this configuration's first probe."""
    probe_qie(editor, size, 2, False)  # warm-up: compiles what is compiled
    probes = [probe_qie(editor, size, 2, False, stamp_steps=False) for _ in range(3)]
    row = stage_row(name, size, plan, probes[0])
    for stage in ("text_encode", "condition_encode", "decode"):
        seconds = statistics.median(p.timings[stage] for p in probes)
        setattr(row, f"{stage}_s", seconds)
        row.e2e_s[stage] = seconds
    row.e2e_s["edit_2_steps"] = statistics.median(p.e2e_s for p in probes)
    row.resident_gib = bench.resident_gib()
    if plain is not None:
        diff = difference(probes[0].image, plain.image)
        row.psnr_vs_ref, row.max_abs_vs_ref = diff.psnr, diff.max_abs
        row.notes.append("PSNR against the plain pipeline")
    if freed_gib is not None:
        row.notes.append(f"frees {freed_gib:.2f} GiB of GPU memory")
    bench.add(row)
    return probes[0]


def restart_command(bench: Any, size: int, out: str) -> list[str]:
    """The restart section's child: the quality section at 2 CFG steps and `size`, with this run's model,
    device, seed and speed flags (compile mode, attention, its quantization, the VAE's compile)."""
    args = bench.args
    command = [sys.executable, "-m", "qie", "bench", "--sections", "quality", "--quality-steps", "2"]
    command += ["--sizes", str(size), "--scale", args.scale, "--model-variant", bench.variant]
    command += ["--device", bench.device.type, "--seed", str(args.seed), "--out", out]
    for flag in ("compile_mode", "attention", "attention_quant", "vae_compile"):
        value = getattr(args, flag, None)
        if value is not None:
            command += [f"--{flag.replace('_', '-')}", str(value)]
    return command


def run_restart(bench: Any) -> None:
    """A first edit in a fresh process with empty compile caches, then in another with what the first left on disk.

    Each process runs the quality section (2 CFG steps, the fastest plan) at the first size; the
    caches (qie's, Inductor's, Triton's) live in a temporary folder that only these two processes use.
    """
    bench.check_time("restart")
    size = bench.args.sizes[0]
    with tempfile.TemporaryDirectory(prefix="qie-restart-") as tmp:
        cache = Path(tmp) / "cache"
        env = {  # Inductor's and Triton's folders too: a variable already set in this environment wins over QIE_CACHE
            **os.environ,
            "QIE_CACHE": str(cache),
            "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
            "TRITON_CACHE_DIR": str(cache / "triton"),
        }
        command = restart_command(bench, size, tmp)
        rows, walls = {}, {}
        for label in ("cold", "warm"):
            start = time.perf_counter()
            done = subprocess.run([*command, "--tag", label], env=env, capture_output=True, text=True)
            walls[label] = time.perf_counter() - start
            report = Path(tmp) / f"bench-{label}.json"
            if done.returncode != 0 or not report.exists():
                raise RuntimeError(f"restart: the {label} process exited {done.returncode}: {done.stderr[-1500:]}")
            rows[label] = json.loads(report.read_text())["rows"][0]
    warm = rows["warm"]
    row = Row(
        name=f"restart: first edit (2 CFG steps) in a new process, cold caches then the first's ({warm['name']})",
        size=size,
        plan=warm["plan"],
        step_s_cfg=warm["step_s_cfg"],
        peak_gib=warm["peak_gib"],
        e2e_s={
            "first_edit_cold": rows["cold"]["e2e_s"]["first_edit"],
            "first_edit_warm": warm["e2e_s"]["first_edit"],
            "process_cold": walls["cold"],
            "process_warm": walls["warm"],
        },
        notes=["process_*: the child's whole run (load, first edit, timed edit, profile)"],
    )
    bench.add(row)


SECTIONS = {
    "fast": run_fast,
    "quality": run_quality,
    "compile": run_compile_modes,
    "encoders": run_encoders,
    "restart": run_restart,
}
CUDA_ONLY = ("compile",)
