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
  gelu-graph the same kernel against its candidate forms (`benchmarks.gelu_variants`: rows per program,
             a persistent loop over rows with pipeline stages, the text and image rows in one launch),
             each timed from a CUDA graph (no launch cost) and checked equal to it.
  small-gemm fp8 GEMMs of few rows (the modulation's one row, the text stream's projections, batched
             CFG's text): cuBLAS against a Triton tile kernel at several tile shapes and a GEMV kernel
             (`benchmarks.gemm_variants`), from CUDA graphs, with the weight-read floor.
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
             language model's CUDA graphs, and their error; without the vision blocks' graphs, and
             whether the embeddings are equal), its parts' seconds, GPU busy time, a
             cProfile of one call, with the garbage collector's pauses per call (h200-ad also
             measured it after a compile and with `gc.freeze`: no gain).
  encode-order both encode stages as an edit runs them (the VAE encode queued before the text encoder's
             host-side image preparation, no wait between) against the same with a wait for the GPU
             after each stage, at 1024² and 768²: seconds, the timer's stage seconds.
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
  transformer-graphs the full-size fp8 transformer (60 compiled blocks, FA3) called as a fast-mode step
             calls it, as it is against replayed from its CUDA graph (`qie.speed.transformer_graphs`) at
             the `--sizes`: milliseconds and host milliseconds per call, the recording, equal outputs.
  prologue   the same transformer with its blocks' LayerNorm + modulation + fp8 quantization as Inductor
             fuses it, then as one Triton op per stream and norm handing fp8 rows to the projections
             (`qie.speed.block_prologue`), then Inductor's again (drift), at the `--sizes`: milliseconds
             as it is and replayed from a CUDA graph, kernel tables, error against bf16 weights.
  prologue-kernel the op's kernel alone at 8192 rows (norm pass, gated sum + norm pass) for 1 to 8 rows per
             program under 4 to 16 warps: its profiled milliseconds per call, the best pair.
  values     the same transformer under fp8 attention with the values' join and fp8 cast as Inductor
             compiles it, then as the two-pass Triton op (`qie.speed.fp8_values`), then Inductor's
             again, at the `--sizes`: the prologue section's tables.
  values-kernel the op's two kernels alone at 1024²'s joint values for 16 to 128 tokens per program under
             2 to 8 warps: their profiled milliseconds per call, the fastest setting.

Writes `fast-levers-<tag>.json` in `--out` after each section; every time is a median of CUDA-event
timings after warm-up. Stopped by SIGTERM (`timeout`), it writes what it has, the blocks section's
finished variants included, and ends.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import profiling  # noqa: F401  (tears CUPTI down after each profile)
from benchmarks.levers_blocks import (
    run_blocks,
    run_coordinate_descent,
    run_inductor_options,
    run_prologue,
    run_prologue_kernel,
    run_transformer_graphs,
    run_values,
    run_values_kernel,
)
from benchmarks.levers_encoders import run_encode_order, run_text, run_text_stage, run_vae, run_vae_compile
from benchmarks.levers_kernels import (
    run_attention,
    run_gelu_graph,
    run_gelu_warps,
    run_kernels,
    run_mlp,
    run_ops,
    run_rope,
    run_small_gemm,
)

log = logging.getLogger("benchmarks.fast_levers")

SECTIONS = {
    "kernels": run_kernels,
    "gelu-warps": run_gelu_warps,
    "gelu-graph": run_gelu_graph,
    "small-gemm": run_small_gemm,
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
    "transformer-graphs": run_transformer_graphs,
    "prologue": run_prologue,
    "prologue-kernel": run_prologue_kernel,
    "values": run_values,
    "values-kernel": run_values_kernel,
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
    parser.add_argument("--sizes", default="1024,768", help="transformer-graphs, prologue, values: square output sizes")
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
