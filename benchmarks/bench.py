"""`python -m qie bench`: qie's plans and options against stock diffusers, in one run, on one GPU.

Every configuration runs on the same full-size random weights (`benchmarks.random_model`, rebuilt from
the same seed whenever a plan changes the weights in place) and is reported as a ratio to stock
diffusers measured in the same run. Numerics: each configuration's image is compared with the
bf16 reference image (qie's staged path with its fixes off, which equals stock bit for bit) on
the same weights and seed: PSNR and max error on 8-bit pixels. Random weights say nothing about
edit quality; they do measure speed, memory and how far an option moves the numbers.

Sections (``--sections``):
  stock     stock `pipe(...)`, resident bf16, native SDPA: the baseline
  resident  qie's staged path: plan resident; with cuDNN attention; with regional compile
  fp8       plan resident-fp8 (torchao fp8 rowwise) + regional compile
  budgets   the automatic planner under emulated budgets (24, 16, 10, 8, 6 GiB), with host RAM peaks;
            at the largest budget <= 10 GiB also fast mode (8 and 4 steps) end to end
  options   step cache, early exit, condition_area="output", each vs the same plan without it
  batching  images/hour of batched denoising vs batch 1
  fast, quality, compile, encoders: the fast path to the floor (`benchmarks.bench_fast`)
  lora      a fused user LoRA (random, real shapes): resident, and the stream plan at 10 GiB (CUDA)
  placement text encoder (bf16 / fp8 storage) and VAE tiling choices on fp8-te-stream (`benchmarks.placement`)

The JSON goes to ``--out`` (default ``benchmarks/``), one line of summary per configuration
is printed, and a table at the end. On CUDA, ``nvidia-smi`` samples the GPU's SM clock, power and
clock-limit reasons every 100 ms beside the run (``smi-<tag>.csv``), and each row gets a summary of
the samples taken while the GPU was busy in its window (``clocks``; `benchmarks.clocks`).
Arguments: see `python -m qie bench --help`.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import time
import traceback
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from benchmarks.clocks import ClockTrace
from benchmarks.placement import run_placement
from benchmarks.probes import PROMPT, Row, probe_qie, probe_stock
from qie.core.registry import check_variant
from qie.core.tolerances import difference
from qie.versions import __version__

log = logging.getLogger(__name__)


def predicted_step(pipe, device: torch.device, plan: str) -> dict[str, Any]:
    """The cost model's forward and CFG-step seconds for `plan` on `device` (`qie.memory.cost`)."""
    from dataclasses import asdict as fields

    from qie.memory.cost import predict_pipe
    from qie.speed.fa3 import installed

    p, gpu = predict_pipe(pipe, device, plan, fa3=installed())
    return {**fields(p), "cfg_step_s": p.cfg_step_s, "bound": p.bound, "pcie_gbps": gpu.pcie_gbps}


class Bench:
    """Holds the run's settings, the reference images and the rows; writes the JSON."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.variant = check_variant(args.model_variant)  # "2509" or "2511": the transformer flavour built
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.rows: list[Row] = []
        self.budgets: list[dict[str, Any]] = []
        self.batching: list[dict[str, Any]] = []
        self.errors: list[dict[str, str]] = []
        self.reference: dict[int, Image.Image] = {}
        self.stock: dict[int, Row] = {}
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = datetime.now(timezone.utc)
        self.t0 = time.perf_counter()
        self.clocks: ClockTrace | None = None
        self.clock_note = self.start_clocks()
        self.row_start = time.time()  # the current row's window in the clock trace begins here

    def check_time(self, what: str) -> None:
        """Stop starting new work once `--max-seconds` have passed, so the JSON always comes back."""
        elapsed = time.perf_counter() - self.t0
        if self.args.max_seconds and elapsed > self.args.max_seconds:
            raise TimeoutError(f"skipped {what}: {elapsed:.0f}s > --max-seconds {self.args.max_seconds}")

    # -- building ------------------------------------------------------------------------------

    def fresh_pipe(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.args.scale == "tiny":
            from qie.core.models import load_pipeline

            tiny = "tiny" if self.variant == "2509" else f"tiny-{self.variant}"
            return load_pipeline(tiny, device=self.device, dtype=torch.float32).to(self.device)
        from benchmarks.random_model import build_random_pipeline

        return build_random_pipeline(self.device, torch.bfloat16, seed=self.args.seed, variant=self.variant)

    def editor(self, pipe, plan: str, budget_gib: float | None = None, fixes: bool = True):
        from qie.core.editor import Editor
        from qie.core.encode_cache import EditCache
        from qie.memory.plans import PLANS

        chosen = PLANS[plan]
        chosen.apply(pipe, self.device, budget_gib)
        dtype = torch.float32 if self.args.scale == "tiny" else torch.bfloat16
        editor = Editor(
            pipe,
            model=f"random-{self.args.scale}-{self.variant}",
            device=self.device,
            dtype=dtype,
            plan=chosen,
            fixes={"mm_token_type_ids": fixes},
        )
        editor.cache = EditCache(max_entries=0)  # every probe pays for its text and condition encode
        return editor

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor()

    def cap_memory(self, budget_gib: float) -> None:
        """Emulate a GPU of `budget_gib`: free what is cached, then cap this process's share of the device."""
        gc.collect()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib / total))

    def resident_gib(self) -> float | None:
        return torch.cuda.memory_allocated() / 2**30 if self.device.type == "cuda" else None

    # -- measuring -----------------------------------------------------------------------------

    def measure(self, name: str, plan: str, size: int, run, *, e2e_40: bool = False, started: bool = False) -> Row:
        """Warm up, then 8 steps without CFG and `--probe-steps` with CFG; compare with the reference.

        `started`: the caller checked `--max-seconds` before work this row needs (a compile warm-up),
        so the row is measured even past the limit rather than losing that work.
        """
        if not started:
            self.check_time(f"{name} @ {size}")
        row = Row(name=name, size=size, plan=plan, resident_gib=self.resident_gib())
        run(size, 2, True)  # warm-up with CFG (both prompt lengths): kernels, autotuning, compilation
        nocfg = run(size, 8, False)
        cfg = run(size, self.args.probe_steps, True)
        row.step_s_nocfg, row.step_s_cfg, row.e2e_8_nocfg_s = nocfg.step_s, cfg.step_s, nocfg.e2e_s
        row.peak_gib = max(p for p in (nocfg.peak_gib, cfg.peak_gib, 0.0) if p is not None) or None
        row.stage_peaks_gib = cfg.stage_peaks_gib
        t = cfg.timings
        row.text_encode_s, row.condition_encode_s, row.decode_s = (
            t.get("text_encode"),
            t.get("condition_encode"),
            t.get("decode"),
        )
        if e2e_40:
            row.e2e_40_cfg_s = run(size, 40, True).e2e_s
            row.e2e_40_cfg_measured = True
        elif cfg.step_s == cfg.step_s:  # not NaN: fixed costs + 40 steps
            fixed = cfg.e2e_s - self.args.probe_steps * cfg.step_s
            row.e2e_40_cfg_s = fixed + 40 * cfg.step_s
        if size in self.reference:
            diff = difference(cfg.image, self.reference[size])
            row.psnr_vs_ref, row.max_abs_vs_ref = diff.psnr, diff.max_abs
        stock = self.stock.get(size)
        if stock and stock is not row:
            row.ratio_step_cfg = stock.step_s_cfg / row.step_s_cfg if row.step_s_cfg else None
            row.ratio_step_nocfg = stock.step_s_nocfg / row.step_s_nocfg if row.step_s_nocfg else None
        self.add(row)
        return row

    def profile(self, row: Row, transformer, trigger, editor=None) -> None:
        """Add where one transformer forward's time goes (`benchmarks.profiling`) to `row`.

        `editor`'s transformer CUDA graphs, if on, are paused meanwhile: a replayed graph never calls the
        transformer, so the profile would have no call to replay. Its kernels are the compiled forward's;
        only the host's launch time differs, which the row's step time already holds."""
        from benchmarks.profiling import profile_forward

        graphs = getattr(editor, "graphs", None)
        if graphs is not None:
            editor.graphs = None
        try:
            row.profile = profile_forward(transformer, trigger, device_name=self.device_name())
        except Exception as exc:  # a profile is a diagnosis: never lose the row for it
            row.notes.append(f"profile failed: {type(exc).__name__}: {exc}")
            return
        finally:
            if graphs is not None:
                editor.graphs = graphs
        if graphs is not None:
            row.profile["transformer_graphs"] = "paused: the compiled forward without its graph"
        p = row.profile
        print(
            f"[bench] profile {row.name}: forward {p['forward_s']:.3f}s, kernels {p['kernel_s']:.3f}s "
            f"({p.get('kernels', 0):.0f} launched), "
            f"host-to-device copies {p['h2d_s']:.3f}s, host self time {p['host_s']:.3f}s",
            flush=True,
        )
        print("[bench]   host, largest: " + ", ".join(f"{k} {v:.4f}" for k, v in p["host_top_s"].items()), flush=True)
        floors = p.get("floors_s", {})
        print(
            "[bench]   by category (s, floor): "
            + ", ".join(f"{k} {v:.4f} ({floors.get(k, 0.0):.4f})" for k, v in p["categories_s"].items()),
            flush=True,
        )
        self.save()

    def fast_plan(self) -> str:
        """The fastest plan this device runs: resident-fp8 (with compile) on a GPU, resident on the CPU."""
        return "resident-fp8" if self.device.type == "cuda" else "resident"

    def start_clocks(self) -> str:
        """Start sampling the GPU's clock and power into `smi-<tag>.csv` (`benchmarks.clocks`); what runs."""
        if self.device.type != "cuda":
            return "off: not a CUDA device"
        uuid = str(getattr(torch.cuda.get_device_properties(self.device), "uuid", "") or "")
        gpus: list[int | str] = [uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"] if uuid else []
        gpus.append(self.device.index or 0)  # nvidia-smi's index: right unless CUDA_VISIBLE_DEVICES reorders
        reasons = []
        for gpu in gpus:
            trace = ClockTrace(self.out / f"smi-{self.args.tag}.csv", gpu=gpu)
            why_not = trace.start()
            if why_not is None:
                self.clocks = trace
                return f"nvidia-smi --id={gpu} every {trace.interval_ms} ms: smi-{self.args.tag}.csv"
            reasons.append(why_not)
        return "off: " + "; ".join(reasons)

    def stop_clocks(self) -> None:
        if self.clocks is not None:
            self.clocks.stop()

    def add(self, row: Row) -> None:
        """Keep `row` (with the clock summary of its window: since the previous row or the section's start),
        print its line and save the JSON."""
        now = time.time()
        if self.clocks is not None:
            row.clocks = self.clocks.summary(self.row_start, now)
        self.row_start = now
        self.rows.append(row)
        self.report(row)
        self.save()

    def report(self, row: Row) -> None:
        def f(v, fmt="{:.3f}"):
            return "-" if v is None else fmt.format(v)

        print(
            f"[bench] {row.name:34} {row.size:5} step {f(row.step_s_nocfg)}s / cfg {f(row.step_s_cfg)}s"
            f"  e2e8 {f(row.e2e_8_nocfg_s, '{:.2f}')}s e2e40cfg {f(row.e2e_40_cfg_s, '{:.1f}')}s"
            f"  peak {f(row.peak_gib, '{:.1f}')}GiB  x{f(row.ratio_step_cfg, '{:.2f}')}"
            f"  psnr {f(row.psnr_vs_ref, '{:.1f}')}" + "".join(f"  {k} {v:.2f}s" for k, v in row.e2e_s.items()),
            flush=True,
        )
        if row.clocks:
            c = row.clocks
            print(
                f"[bench]   GPU busy: SM {c['sm_mhz_median']:.0f} MHz (10th percentile {c['sm_mhz_p10']:.0f}),"
                f" {c['power_w_median']:.0f} W, power-capped {c['power_capped']:.0%} of {c['samples']} samples",
                flush=True,
            )

    def section(self, name: str, fn) -> None:
        print(f"[bench] --- {name}", flush=True)
        start = time.perf_counter()
        self.row_start = time.time()
        try:
            fn()
        except Exception as exc:  # keep the other sections' numbers
            self.errors.append(
                {"section": name, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
            )
            print(f"[bench] section {name} failed: {type(exc).__name__}: {exc}", flush=True)
        finally:
            if self.device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0)
            print(f"[bench] --- {name} took {time.perf_counter() - start:.0f}s", flush=True)
            self.save()

    def save(self) -> Path:
        path = self.out / f"bench-{self.args.tag}.json"
        path.write_text(json.dumps(self.payload(), indent=1, default=str))
        return path

    def payload(self) -> dict[str, Any]:
        from qie.versions import installed

        gpu = self.device_name()
        return {
            "meta": {
                "qie": __version__,
                "date": self.started.isoformat(timespec="seconds"),
                "device": gpu,
                "scale": self.args.scale,
                "model_variant": self.variant,
                "versions": installed(),
                "cuda": torch.version.cuda,
                "probe_steps_cfg": self.args.probe_steps,
                "prompt": PROMPT,
                "weights": "random (seeded), full-size configs" if self.args.scale == "full" else "tiny random",
                "clock_trace": self.clock_note,
            },
            "rows": [{**asdict(r), "model_variant": self.variant} for r in self.rows],
            "budgets": self.budgets,
            "batching": self.batching,
            "errors": self.errors,
        }

    # -- sections ------------------------------------------------------------------------------

    def run_stock(self) -> None:
        pipe = self.fresh_pipe().to(self.device)
        pipe.set_progress_bar_config(disable=True)
        ref_editor = self.editor(pipe, "resident", fixes=False)
        for size in self.args.sizes:
            # The bf16 reference: qie's staged path with fixes off (bit-exact to stock, checked below).
            self.reference[size] = probe_qie(ref_editor, size, self.args.probe_steps, True, batch_cfg=False).image
            row = self.measure(
                "stock diffusers (resident, sdpa)",
                "stock",
                size,
                lambda s, n, c: probe_stock(pipe, s, n, c),
                e2e_40=self.args.e2e_40 and size == 1024,
            )
            self.stock[size] = row
            self.profile(row, pipe.transformer, lambda s=size: probe_stock(pipe, s, 2, False))
            if row.max_abs_vs_ref:
                row.notes.append("stock differs from qie's staged path with fixes off")

    def run_resident(self) -> None:
        pipe = self.fresh_pipe()
        editor = self.editor(pipe, "resident", fixes=False)
        for size in self.args.sizes:
            self.measure("qie resident (sdpa)", "resident", size, lambda s, n, c: probe_qie(editor, s, n, c))
        if self.device.type == "cuda":
            pipe.transformer.set_attention_backend("_native_cudnn")
            for size in self.args.sizes:
                self.measure(
                    "qie resident + cudnn attention", "resident", size, lambda s, n, c: probe_qie(editor, s, n, c)
                )
            pipe.transformer.set_attention_backend("native")  # cuDNN was not faster on an H100
            from qie.speed.compile import compile_blocks

            if compile_blocks(pipe.transformer):
                for size in self.args.sizes:
                    self.measure("qie resident + compile", "resident", size, lambda s, n, c: probe_qie(editor, s, n, c))

    def run_fp8(self) -> None:
        from qie.speed.compile import compile_blocks

        pipe = self.fresh_pipe()
        editor = self.editor(pipe, "resident-fp8", fixes=False)
        compile_blocks(pipe.transformer)
        for size in self.args.sizes:
            self.measure(
                "qie resident-fp8 + compile",
                "resident-fp8",
                size,
                lambda s, n, c: probe_qie(editor, s, n, c),
                e2e_40=self.args.e2e_40 and size == 1024,
            )

    def run_budgets(self) -> None:
        for budget in self.args.budgets:
            try:
                self.check_time(f"budget {budget:g} GiB")
                self.run_budget(budget)
            except Exception as exc:  # one budget failing must not hide the others
                self.errors.append(
                    {
                        "section": f"budget {budget:g}",
                        "error": f"{type(exc).__name__}: {exc}",
                        "trace": traceback.format_exc()[-3000:],
                    }
                )
                print(f"[bench] budget {budget:g} GiB failed: {type(exc).__name__}: {exc}", flush=True)
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0)
                gc.collect()
                torch.cuda.empty_cache()

    def run_budget(self, budget: float) -> None:
        from qie.speed import fa3

        attention = fa3.NAME if fa3.install(self.device) else "native"  # as `Editor.load` chooses it
        try:
            self.run_budget_with(budget, attention)
        finally:
            fa3.uninstall()

    def run_budget_with(self, budget: float, attention: str) -> None:
        from benchmarks.profiling import host_peak_gib, reset_host_peak
        from qie.memory.plans import choose_plan, measure_sizes, resident_blocks

        reset_host_peak()
        pipe = self.fresh_pipe()
        plan = choose_plan(pipe, self.device, "auto", budget_gib=budget)
        blocks = resident_blocks(measure_sizes(pipe, device=self.device), budget) if plan.name == "stream" else None
        editor = self.editor(pipe, plan.name, budget_gib=budget)
        editor.enable_compile()  # the stream plan too: block forwards compiled, weights rebound per call
        self.cap_memory(budget)
        row = self.measure(f"qie auto @ {budget:g} GiB", plan.name, 1024, lambda s, n, c: probe_qie(editor, s, n, c))
        self.profile(row, pipe.transformer, lambda: probe_qie(editor, 1024, 2, False), editor)
        placement = getattr(pipe, "qie_placement", None)
        streamer = getattr(pipe.transformer.transformer_blocks, "qie_streamer", None)
        te_arena = getattr(pipe.text_encoder, "qie_pinned", None)
        host = host_peak_gib()
        row.notes += [f"host RAM peak {host:.1f} GiB"] if host else []
        row.notes += [placement.describe()] if placement else []
        self.save()
        self.budgets.append(
            {
                "budget_gib": budget,
                "plan": plan.name,
                "resident_blocks": blocks,
                "step_s_cfg": row.step_s_cfg,
                "step_s_nocfg": row.step_s_nocfg,
                "peak_gib": row.peak_gib,
                "ratio_step_cfg": row.ratio_step_cfg,
                "ratio_step_nocfg": row.ratio_step_nocfg,
                "profile": row.profile,
                "predicted": predicted_step(pipe, self.device, plan.name),
                "batch_cfg": editor._batch_cfg_pays,
                "attention": attention,
                "placement": placement.describe() if placement else None,
                "host_peak_gib": host,
                "streamed_blocks_gib": streamer.host_bytes() / 2**30 if streamer else 0.0,
                "pinned_blocks_gib": streamer.pinned_bytes() / 2**30 if streamer else 0.0,
                "pinned_text_encoder_gib": te_arena.reserved_bytes / 2**30 if te_arena else 0.0,
            }
        )
        if budget == max((b for b in self.args.budgets if b <= 10), default=None):  # fast mode at <= 10 GiB
            # Every reference to this plan's pipeline goes first: its streamer alone holds the resident
            # blocks' GPU buffers (keeping it made the fast build run out of memory under the cap).
            del editor, pipe, streamer, row, te_arena
            gc.collect()
            from benchmarks.bench_fast import run_fast_under_budget

            run_fast_under_budget(self, budget)

    def run_fast_budget(self) -> None:
        """Fast mode at the largest budget <= 10 GiB of `--budgets` (what `budgets` adds after that budget's row)."""
        from benchmarks.bench_fast import run_fast_under_budget

        budget = max((b for b in self.args.budgets if b <= 10), default=10.0)
        run_fast_under_budget(self, budget)

    def lora_pipe(self):
        """A fresh pipeline with a random user LoRA of the real shapes (rank 64) fused, as `Editor.load` does."""
        import tempfile

        from qie.core.loras import fuse_loras
        from qie.speed.fast_mode import random_lightning_lora

        pipe = self.fresh_pipe()
        with tempfile.TemporaryDirectory() as tmp:
            lora = random_lightning_lora(pipe.transformer, Path(tmp) / "user-lora.safetensors", dtype=pipe.dtype)
            fuse_loras(pipe, [str(lora)])
        return pipe

    def run_lora(self) -> None:
        """A fused user LoRA: per-step time against `qie resident (sdpa)` (same plan, no LoRA), and on CUDA
        the stream plan at 10 GiB with compile, whose packed fp8 weights carry the LoRA. The LoRA changes the image:
        PSNR against the reference says nothing here."""
        pipe = self.lora_pipe()
        editor = self.editor(pipe, "resident", fixes=False)
        for size in self.args.sizes:
            self.measure("qie resident + fused user LoRA", "resident", size, lambda s, n, c: probe_qie(editor, s, n, c))
        if self.device.type != "cuda":
            return
        del editor, pipe
        budget = 10.0
        pipe = self.lora_pipe()
        editor = self.editor(pipe, "stream", budget_gib=budget)
        compiled = editor.enable_compile()  # as the budgets section runs the stream plan
        self.cap_memory(budget)
        name = f"qie stream @ {budget:g} GiB{' + compile' if compiled else ''} + fused user LoRA"
        self.measure(name, "stream", 1024, lambda s, n, c: probe_qie(editor, s, n, c))

    def run_options(self) -> None:
        """Step cache, early exit and condition area, each vs the same plan without it.

        `--options-plan eager` runs them on the bf16 resident plan without compile (no minutes of
        compilation); the default runs them on the fastest plan (fp8 + compile on a GPU).
        """
        from benchmarks.probes import time_e2e
        from qie.speed.compile import compile_blocks

        eager = getattr(self.args, "options_plan", "fastest") == "eager"
        plan = "resident" if eager else self.fast_plan()
        pipe = self.fresh_pipe()
        editor = self.editor(pipe, plan)
        if self.device.type == "cuda" and not eager:
            compile_blocks(pipe.transformer)
        steps = self.args.option_steps
        for size in self.args.sizes:
            base = time_e2e(editor, size, steps, True, repeats=1)
            variants = {
                "step_cache=fbcache": {"step_cache": "fbcache"},
                "step_cache=taylorseer": {"step_cache": "taylorseer"},
                "early_exit_threshold=0.02": {"early_exit_threshold": 0.02},
                "condition_area=output": {"condition_area": "output"},
            }
            for label, options in variants.items():
                self.check_time(f"option {label}")
                probe = time_e2e(editor, size, steps, True, repeats=1, **options)
                diff = difference(probe.image, base.image)
                row = Row(
                    name=f"{label} ({steps} steps CFG, {plan}{'' if eager else ' + compile'})",
                    size=size,
                    plan=plan,
                    step_s_cfg=probe.step_s,
                    peak_gib=probe.peak_gib,
                    e2e_s={"option": probe.e2e_s, "without": base.e2e_s},
                    psnr_vs_ref=diff.psnr,
                    max_abs_vs_ref=diff.max_abs,
                    notes=["PSNR against the same plan without the option"],
                )
                self.add(row)

    def run_batching(self) -> None:
        """Throughput of batched denoising (`benchmarks.batching.bench_batching`) on the resident plan."""
        from benchmarks.batching import bench_batching

        pipe = self.fresh_pipe()
        editor = self.editor(pipe, "resident")
        sizes = [(size, size) for size in self.args.sizes]
        self.batching = bench_batching(editor, sizes=sizes, batch_sizes=(1, 2, 4), steps=self.args.probe_steps)
        for row in self.batching:
            print(f"[bench] batching {row}", flush=True)

    def table(self) -> str:
        lines = [
            "| config | size | plan | s/step | s/step CFG | ×stock (CFG) | e2e 8 | e2e 40 CFG | peak GiB | PSNR |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:

            def f(v, fmt):
                return "-" if v is None else fmt.format(v)

            lines.append(
                f"| {r.name} | {r.size} | {r.plan} | {f(r.step_s_nocfg, '{:.3f}')} | {f(r.step_s_cfg, '{:.3f}')} | "
                f"{f(r.ratio_step_cfg, '{:.2f}')} | {f(r.e2e_8_nocfg_s, '{:.2f}')} | {f(r.e2e_40_cfg_s, '{:.1f}')} | "
                f"{f(r.peak_gib, '{:.1f}')} | {f(r.psnr_vs_ref, '{:.1f}')} |"
            )
        return "\n".join(lines)


SECTIONS = {
    "stock": Bench.run_stock,
    "resident": Bench.run_resident,
    "fp8": Bench.run_fp8,
    "budgets": Bench.run_budgets,
    "options": Bench.run_options,
    "batching": Bench.run_batching,
    "lora": Bench.run_lora,
    "placement": run_placement,
    "fast-budget": lambda bench: bench.run_fast_budget(),
}


def run(args: argparse.Namespace) -> int:
    args.tag = args.tag or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M")
    args.sizes = [int(s) for s in str(args.sizes).split(",") if s]
    args.budgets = [float(b) for b in str(args.budgets).split(",") if b]
    from qie.speed.options import COMPILE_MODES

    for mode in str(getattr(args, "compile_modes", "")).split(","):
        if mode and mode not in COMPILE_MODES:
            raise SystemExit(f"--compile-modes: unknown mode {mode!r}; use {', '.join(COMPILE_MODES)}")
    from benchmarks import bench_fast

    sections = [s for s in args.sections.split(",") if s]
    every = {**SECTIONS, **bench_fast.SECTIONS}
    for name in sections:
        if name not in every:
            raise SystemExit(f"--sections: unknown section {name!r}; use {list(every)}")
    bench = Bench(args)  # starts the clock trace: after the arguments are checked
    if "stock" not in sections:
        print("[bench] note: without the stock section there are no ratios", flush=True)
    try:
        for name in sections:
            cuda_only = ("fp8", "budgets", "placement", "fast-budget", *bench_fast.CUDA_ONLY)
            if name in cuda_only and bench.device.type != "cuda":
                print(f"[bench] section {name} needs CUDA; skipped", flush=True)
                continue
            bench.section(name, lambda n=name: every[n](bench))
    finally:
        bench.stop_clocks()
    path = bench.save()
    print(bench.table())
    print(f"[bench] wrote {path}")
    return 1 if bench.errors else 0
