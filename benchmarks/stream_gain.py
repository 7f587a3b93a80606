"""What each lever of the stream plan gains: one transformer forward at 1024², full-size random weights.

Only the transformer is built (the stream plan's cost is there); inputs are random tensors of the
real shapes (8192 image tokens, a 230-token prompt, a 12-token negative prompt). Variants, each
timed against the resident bf16 transformer in the same process:

  stock        resident bf16, eager (the baseline)
  upcast       stream plan, fp8 rows upcast to bf16 per block (the old path)
  fp8          stream plan, fp8 matmuls on the stored rows, eager
  fp8+compile  the same with the block forward compiled
  ... cfg2     both CFG branches as one batch-2 call (prompts padded, masked) vs two calls

Run: ``python -m benchmarks.stream_gain --budgets 10,6 --out gain.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from typing import Any

import torch

from benchmarks.profiling import cuda_sync

TEXT, NEG = 230, 12


def build_transformer(device: torch.device, seed: int = 3):
    from diffusers import QwenImageTransformer2DModel

    from benchmarks.random_model import materialize

    return materialize(QwenImageTransformer2DModel, device, torch.bfloat16, seed)


def inputs(device: torch.device, batch2: bool, text_tokens: int = TEXT, size: int = 1024) -> dict[str, Any]:
    """Transformer kwargs for a `size`² edit with its condition at the same area (at 1024²: 4096 output + 4096
    condition tokens), `text_tokens` prompt tokens; batch 2 = cond + padded uncond."""
    g = torch.Generator(device=device).manual_seed(0)
    b = 2 if batch2 else 1
    side = size // 16
    hidden = torch.randn(b, 2 * side * side, 64, device=device, dtype=torch.bfloat16, generator=g)
    text = torch.randn(b, text_tokens, 3584, device=device, dtype=torch.bfloat16, generator=g)
    mask = None
    if batch2:
        mask = torch.ones(2, text_tokens, dtype=torch.long, device=device)
        mask[1, NEG:] = 0
    return {
        "hidden_states": hidden,
        "encoder_hidden_states": text,
        "encoder_hidden_states_mask": mask,
        "timestep": torch.full((b,), 0.5, device=device, dtype=torch.bfloat16),
        "img_shapes": [[(1, side, side), (1, side, side)]] * b,
        "return_dict": False,
    }


def time_forward(transformer, kwargs: dict[str, Any], repeats: int = 3) -> float:
    """Median wall seconds of one forward (after one warm-up call)."""
    with torch.inference_mode():
        transformer(**kwargs)
        times = []
        for _ in range(repeats):
            cuda_sync()
            start = time.perf_counter()
            transformer(**kwargs)
            cuda_sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def resident_count(budget: float, device: torch.device) -> int:
    """How many blocks the planner keeps resident at `budget` GiB (sizes counted on the meta device)."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from benchmarks.random_model import QWEN25_VL_7B_TEXT, QWEN25_VL_7B_VISION
    from qie.core.tiny import build_tokenizer, text_encoder_config
    from qie.memory.plans import measure_sizes, resident_blocks

    with init_empty_weights():
        te = Qwen2_5_VLForConditionalGeneration(
            text_encoder_config(build_tokenizer(), QWEN25_VL_7B_TEXT, QWEN25_VL_7B_VISION)
        )
        pipe = SimpleNamespace(transformer=QwenImageTransformer2DModel(), vae=AutoencoderKLQwenImage(), text_encoder=te)
    return resident_blocks(measure_sizes(pipe, device=device), budget)


def stream_variant(device: torch.device, resident: int, compute: str, compile_: bool) -> dict[str, float]:
    from qie.memory.streaming import BlockStreamer
    from qie.speed.compile import compile_streamed_blocks

    gc.collect()
    torch.cuda.empty_cache()
    tr = build_transformer(device)
    BlockStreamer(tr.transformer_blocks, device, resident=resident, storage="fp8", compute=compute)
    gc.collect()
    torch.cuda.empty_cache()
    if compile_:
        compile_streamed_blocks(tr.transformer_blocks)
    torch.cuda.reset_peak_memory_stats()
    one = time_forward(tr, inputs(device, False))
    two = time_forward(tr, inputs(device, True))
    out = {"forward_s": one, "cfg_batched_s": two, "cfg_two_calls_s": 2 * one}
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del tr
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="10,6")
    parser.add_argument("--variants", default="upcast,fp8,fp8+compile")
    parser.add_argument("--out", default="stream-gain.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    from qie.speed import fa3

    result: dict[str, Any] = {"device": torch.cuda.get_device_name(device), "rows": []}
    tr = build_transformer(device)
    stock = time_forward(tr, inputs(device, False))
    stock2 = time_forward(tr, inputs(device, True))
    del tr
    result["stock"] = {"forward_s": stock, "cfg_batched_s": stock2, "cfg_two_calls_s": 2 * stock}
    print(f"stock forward {stock:.3f}s, batch-2 {stock2:.3f}s", flush=True)
    for budget in [float(b) for b in args.budgets.split(",")]:
        resident = resident_count(budget, device)
        for variant in args.variants.split(","):
            start = time.perf_counter()
            if "fa3" in variant and not fa3.install(device):
                continue
            row = stream_variant(device, resident, variant.split("+")[0], "compile" in variant)
            fa3.uninstall()
            row.update(budget_gib=budget, resident=resident, variant=variant, wall_s=time.perf_counter() - start)
            row["ratio_forward"] = row["forward_s"] / stock
            row["ratio_cfg_step"] = min(row["cfg_batched_s"], row["cfg_two_calls_s"]) / (2 * stock)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
