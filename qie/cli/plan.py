"""`python -m qie plan`: which memory plan a GPU gets at a VRAM budget, and the predicted step times.

Nothing is loaded: the full-size model's component sizes (`qie.memory.plans.FULL_SIZE`) go through
the planner, and the cost model (`qie.memory.cost`) predicts one transformer forward and one CFG
step at 1024² from the GPU's PCIe bandwidth and compute rate.

Example:
    python -m qie plan --gpu rtx4090            # its 24 GB, its parameter set
    python -m qie plan --vram 10 --pcie 25 --tflops 165
    python -m qie plan --gpu all                # one line per documented GPU
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from qie.errors import InvalidRequestError

DEFAULT_GPU = "h100"


def add_plan_parser(sub) -> None:
    """The `plan` subcommand's flags."""
    from qie.memory.cost import GPUS

    plan = sub.add_parser("plan", help="the memory plan and predicted step times for a GPU and VRAM budget")
    plan.add_argument("--gpu", default=DEFAULT_GPU, help=f"parameter set: {', '.join(GPUS)} or 'all'")
    plan.add_argument("--vram", type=float, help="VRAM budget in GiB (default: the GPU's memory)")
    plan.add_argument("--pcie", type=float, help="host-to-device GB/s from pinned memory (default: the GPU's)")
    plan.add_argument("--tflops", type=float, help="dense bf16 TFLOP/s (default: the GPU's)")


def cmd_plan(args: argparse.Namespace) -> int:
    from qie.memory.cost import GPUS

    if args.gpu != "all" and args.gpu not in GPUS:
        raise InvalidRequestError("--gpu", args.gpu, f"use one of {', '.join(GPUS)} or 'all'")
    for flag, value in (("--vram", args.vram), ("--pcie", args.pcie), ("--tflops", args.tflops)):
        if value is not None and not value > 0:
            raise InvalidRequestError(flag, value, "give a positive number")
    names = list(GPUS) if args.gpu == "all" else [args.gpu]
    for name in names:
        print(describe(name, args.vram, args.pcie, args.tflops))
        print()
    return 0


def describe(name: str, vram: float | None, pcie: float | None, tflops: float | None) -> str:
    """The plan chosen for GPU `name` at `vram` GiB (its own memory if None) and its predicted times."""
    from qie.memory.cost import GPUS, custom_gpu
    from qie.memory.plans import FULL_SIZE, pick_plan, stages_for

    base = GPUS[name]
    gpu = custom_gpu(base, vram if vram is not None else base.vram_gib * 0.93, pcie, tflops)
    sizes = replace(FULL_SIZE, upcast=not gpu.fp8)
    plan = pick_plan(sizes, gpu.vram_gib, budget_name="vram")  # the CLI shows it as --vram
    p, detail, peak = predict_plan(plan.name, gpu, sizes)
    units = "fp8 units" if gpu.fp8 else "no fp8 units (fp8 weights upcast to bf16)"
    cfg = "batched" if p.batch_cfg else "two calls"
    stages = stages_for(plan.name, sizes, gpu.vram_gib)
    return "\n".join(
        [
            f"{gpu.label}: {gpu.pcie_gbps:g} GB/s host-to-device, {gpu.tflops:g} TFLOP/s bf16, {units}",
            f"budget {gpu.vram_gib:.1f} GiB -> plan {plan.name!r} (predicted peak {peak:.1f} GiB)" + detail,
            "stages: " + (stages.describe() if stages else "text encoder and VAE on the GPU, VAE untiled"),
            f"1024² transformer forward {p.forward_s:.3f} s ({p.bound}-bound); CFG step {p.cfg_step_s:.3f} s "
            f"({cfg}; two calls {p.cfg_two_calls_s:.3f} s, batched {p.cfg_batched_s:.3f} s)",
            f"denoising: 8 steps without CFG {8 * p.forward_s:.1f} s, 40 CFG steps {40 * p.cfg_step_s:.1f} s",
        ]
    )


def predict_plan(plan: str, gpu, sizes):
    """The cost model's `Prediction` for `plan` on `gpu`, a note on what streams, and the predicted peak GiB."""
    from qie.memory.cost import predict_resident, predict_stream
    from qie.memory.plans import PLANS, resident_blocks
    from qie.memory.streaming import spread

    need = PLANS[plan].need_gib(sizes)
    if plan != "stream":
        return predict_resident(gpu, fp8=plan != "resident" and gpu.fp8, fa3=gpu.fa3), "", need
    resident = resident_blocks(sizes, gpu.vram_gib)
    kept = spread(resident, len(sizes.blocks_fp8))
    streamed = sum(size for i, size in enumerate(sizes.blocks_fp8) if i not in kept)
    note = f", {resident} of {len(sizes.blocks_fp8)} blocks resident, {streamed:.1f} GiB streamed per forward"
    peak = need + sum(sizes.blocks_fp8[i] for i in kept)
    return predict_stream(gpu, streamed, weights_gib=sum(sizes.blocks_fp8), fa3=gpu.fa3), note, peak
