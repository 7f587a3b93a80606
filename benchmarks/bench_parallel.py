"""Multi-GPU latency on full-size random weights: CFG-parallel and Ulysses against one GPU and stock.

Run with torchrun, one process per GPU (each holds a full bf16 copy, ~58 GiB):

    torchrun --nproc-per-node 2 -m benchmarks.bench_parallel --out benchmarks --tag h100x2

Every rank builds the same seeded random pipeline and measures, at one size, in this order:
stock diffusers on its own GPU (the baseline), qie on one GPU (the reference image), then the
same edit over all ranks: CFG-parallel for an edit with true CFG (when the count is even), and
context parallelism (Ulysses over all ranks) for an edit without CFG. Rank 0 writes the JSON:
s/step and end-to-end seconds, the ratio to one GPU and to stock, and PSNR / max error of the
multi-GPU image against the one-GPU image.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="torchrun ... -m benchmarks.bench_parallel", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per probe")
    ap.add_argument("--seed", type=int, default=0, help="weights' seed")
    ap.add_argument("--cp-mode", default="ulysses", help="context parallelism for the edit without CFG")
    ap.add_argument("--skip-cfg", action="store_true", help="measure context parallelism only")
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--tag", default=None)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from benchmarks.bench import Bench
    from benchmarks.probes import probe_qie, probe_stock
    from qie.core.tolerances import difference
    from qie.serving.parallel import CP_MODES, PROCESS_GROUP_BACKEND, enable, plan_layout
    from qie.versions import installed

    args = parse(argv)
    if args.cp_mode not in CP_MODES:
        print(f"error: --cp-mode {args.cp_mode!r}: use one of {CP_MODES}", file=sys.stderr)
        return 2
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if not torch.cuda.is_available() or torch.cuda.device_count() < world or world < 2:
        print("error: needs torchrun with 2 or more ranks, one CUDA GPU each", file=sys.stderr)
        return 2
    torch.cuda.set_device(local)
    dist.init_process_group(PROCESS_GROUP_BACKEND)
    device = torch.device("cuda", local)
    size, steps = args.size, args.steps
    rows: list[dict[str, Any]] = []

    def say(msg: str) -> None:
        if rank == 0:
            print(f"[bench-parallel] {msg}", flush=True)

    def record(name: str, cfg: bool, probe, reference=None, base=None) -> dict[str, Any]:
        row: dict[str, Any] = {"name": name, "cfg": cfg, "size": size, "steps": steps}
        row.update(step_s=probe.step_s, e2e_s=probe.e2e_s, peak_gib=probe.peak_gib)
        if reference is not None:
            diff = difference(probe.image, reference)
            row.update(psnr_vs_one_gpu=diff.psnr, max_abs_vs_one_gpu=diff.max_abs)
        if base is not None:
            row.update(speedup_step=base.step_s / probe.step_s, speedup_e2e=base.e2e_s / probe.e2e_s)
        rows.append(row)
        say(f"{name}: {probe.step_s:.3f} s/step, {probe.e2e_s:.2f} s end to end")
        return row

    def measure(run, cfg: bool):
        run(size, 2, cfg)  # warm-up
        dist.barrier()
        return run(size, steps, cfg)

    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    bench = Bench(
        argparse.Namespace(
            device=str(device), scale="full", seed=args.seed, out=args.out, max_seconds=0, model_variant="2509"
        )
    )
    pipe = bench.fresh_pipe()
    pipe.set_progress_bar_config(disable=True)
    say(f"built the random pipeline on {world} GPUs in {time.perf_counter() - t0:.0f}s")
    stock = {cfg: measure(lambda s, n, c: probe_stock(pipe, s, n, c), cfg) for cfg in (True, False)}
    for cfg, probe in stock.items():
        record("stock diffusers, one GPU", cfg, probe)
    editor = bench.editor(pipe, "resident", fixes=False)
    one = {cfg: measure(lambda s, n, c: probe_qie(editor, s, n, c), cfg) for cfg in (True, False)}
    for cfg, probe in one.items():
        record("qie resident, one GPU", cfg, probe, reference=stock[cfg].image, base=stock[cfg])

    layouts = []  # context parallelism changes the transformer for good: it goes last
    if world % 2 == 0 and not args.skip_cfg:
        layouts.append(("cfg", plan_layout(world, cfg=True)))
    layouts.append(("cp", plan_layout(world, cfg=False, cp_mode=args.cp_mode)))
    for label, layout in layouts:
        editor.predictor = None
        enable(editor, layout, rank)
        for cfg in (True, False) if label == "cp" else (True,):
            probe = measure(lambda s, n, c: probe_qie(editor, s, n, c), cfg)
            row = record(f"qie {layout.describe()}", cfg, probe, reference=one[cfg].image, base=one[cfg])
            row["speedup_step_vs_stock"] = stock[cfg].step_s / probe.step_s
            row["speedup_e2e_vs_stock"] = stock[cfg].e2e_s / probe.e2e_s

    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = args.tag or started.strftime("%Y%m%d-%H%M")
        meta = {
            "date": started.isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device),
            "gpus": world,
            "versions": installed(),
            "cuda": torch.version.cuda,
            "weights": "random (seeded), full-size configs",
        }
        path = out / f"bench-parallel-{tag}.json"
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
        print(f"[bench-parallel] wrote {path}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
