"""`torchrun --nproc-per-node N -m qie.cli.parallel ...`: one edit over several GPUs (see `qie.serving.parallel`)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from qie.cli.folders import edit_one
from qie.cli.main import edit_params, edit_parser
from qie.core.editor import Editor
from qie.core.load_options import LoadOptions
from qie.errors import QieError
from qie.serving.parallel import CP_MODES, PROCESS_GROUP_BACKEND, enable, plan_layout


def main(argv: list[str] | None = None) -> int:
    """`torchrun --nproc-per-node N -m qie.cli.parallel IMAGES... --prompt ... --output out.png [--cp-mode ring]`.

    Takes the options of `python -m qie edit` (one edit, not a folder) plus `--cp-mode`.
    """
    import torch
    import torch.distributed as dist

    parser = edit_parser("torchrun --nproc-per-node N -m qie.cli.parallel")
    parser.add_argument(
        "--cp-mode", choices=CP_MODES, default="ulysses", help="how attention is split over GPUs beyond CFG-parallel"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = edit_params(args)
    if params["seed"] is None:
        params["seed"] = 0  # every rank must draw the same noise

    device_type = "cpu" if args.device == "cpu" or not torch.cuda.is_available() else "cuda"
    # torchrun's own variables (not qie settings): how many ranks, and which one this process is.
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    layout = plan_layout(world_size, cfg=args.cfg > 1, cp_mode=args.cp_mode, device_type=device_type)
    if layout is not None and device_type == "cpu" and layout.cp_degree > 1:
        print("error: context parallelism needs CUDA GPUs; on CPU only CFG-parallel (2 ranks) runs", file=sys.stderr)
        return 2
    device = "cpu" if device_type == "cpu" else f"cuda:{local_rank}"
    if layout is not None:
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(PROCESS_GROUP_BACKEND if device_type == "cuda" else "gloo")
    try:
        editor = Editor.load(LoadOptions.from_args(args), device=device)
        if layout is not None:
            enable(editor, layout, rank)
        output = Path(args.output)
        if rank != 0:
            output = output.with_name(f".rank{rank}-{output.name}")
        result = edit_one(editor, [Path(p) for p in args.inputs], output, params)
        if rank == 0:
            print(f"wrote {output} ({layout.describe() if layout else 'one device'}): {result.summary()}")
        else:
            output.unlink(missing_ok=True)
        return 0
    except QieError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if layout is not None and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
