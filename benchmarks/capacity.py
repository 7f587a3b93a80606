"""Capacity: edits per day per GPU, and how many GPU replicas a daily volume needs, from a benchmark.

Reads the GPU benchmark's JSON (`{"meta": {...}, "rows": [...]}`, one row per configuration
and output size, with per-edit seconds `e2e_8_nocfg_s` (fast: 8 steps, no CFG) and
`e2e_40_cfg_s` (quality: 40 steps, true CFG), or per-step seconds and stage times to build them
from) and prints, for each configuration at one size:

    images/day per GPU = 86400 s x utilization / seconds per edit
    replicas           = ceil(target per day / images/day per GPU)

`utilization` is the share of the day a replica is busy editing: traffic is not flat, and a
service sized for its peak runs below 100% on average. An optional `batching` list (rows of
`benchmarks.batching.bench_batching`) adds the measured images/hour at each batch size.

Without a benchmark file, `PLACEHOLDER` holds anchors measured once on an H100 (see the
README); they are labelled as such in every line printed.

Example:
    >>> rows = capacity(PLACEHOLDER["rows"], size=1024)
    >>> round(rows[0].fast_per_day, -2), rows[0].replicas("quality", 100_000)
    (25200.0, 37)

    python -m benchmarks.capacity benchmarks/h100.json --target 100000 --utilization 0.7
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DAY_S = 86_400
FAST_STEPS, QUALITY_STEPS = 8, 40

# Measured on one H100 80GB (bf16, diffusers 0.42.1, random full-size weights, 1024² single edit,
# one prompt ~230 tokens). Per-step times of the transformer; text encoder ~0.13 s a prompt; VAE
# encode and decode ~0.1 s each. Used only when no benchmark JSON is given.
PLACEHOLDER: dict[str, Any] = {
    "meta": {"placeholder": True, "device": "NVIDIA H100 80GB HBM3"},
    "rows": [
        {
            "name": "resident, SDPA",
            "size": 1024,
            "step_s_nocfg": 0.388,
            "step_s_cfg": 0.775,
            "text_encode_s": 0.13,
            "condition_encode_s": 0.1,
            "decode_s": 0.1,
        },
        {
            "name": "resident + compile_repeated_blocks",
            "size": 1024,
            "step_s_nocfg": 0.312,
            "step_s_cfg": 0.623,
            "text_encode_s": 0.13,
            "condition_encode_s": 0.1,
            "decode_s": 0.1,
        },
        {
            "name": "torchao fp8 rowwise + compile",
            "size": 1024,
            "step_s_nocfg": 0.247,
            "step_s_cfg": 0.487,
            "text_encode_s": 0.13,
            "condition_encode_s": 0.1,
            "decode_s": 0.1,
        },
    ],
}


@dataclass(frozen=True)
class Capacity:
    """Throughput of one configuration at one output size, on one GPU."""

    name: str
    size: int
    fast_s: float | None  # seconds per edit, 8 steps without CFG
    quality_s: float | None  # seconds per edit, 40 steps with true CFG
    utilization: float = 1.0

    @property
    def fast_per_day(self) -> float | None:
        return None if not self.fast_s else DAY_S * self.utilization / self.fast_s

    @property
    def quality_per_day(self) -> float | None:
        return None if not self.quality_s else DAY_S * self.utilization / self.quality_s

    def replicas(self, mode: str, per_day: float) -> int | None:
        """GPU replicas needed for `per_day` edits in `mode` ("fast" or "quality")."""
        rate = self.fast_per_day if mode == "fast" else self.quality_per_day
        return None if not rate else math.ceil(round(per_day / rate, 6))  # 49.9999999 is 50 replicas


def edit_seconds(row: dict[str, Any], mode: str) -> float | None:
    """Seconds for one edit in `mode`: the row's measured end-to-end time, else built from its parts.

    Built: text encode (twice with CFG: prompt and negative prompt) + condition encode + steps x
    seconds per step + decode.
    """
    measured = row.get("e2e_8_nocfg_s" if mode == "fast" else "e2e_40_cfg_s")
    if measured:
        return float(measured)
    step = row.get("step_s_nocfg" if mode == "fast" else "step_s_cfg")
    if not step:
        return None
    prompts = 1 if mode == "fast" else 2
    stages = (
        prompts * (row.get("text_encode_s") or 0) + (row.get("condition_encode_s") or 0) + (row.get("decode_s") or 0)
    )
    return stages + (FAST_STEPS if mode == "fast" else QUALITY_STEPS) * float(step)


def capacity(rows: list[dict[str, Any]], *, size: int = 1024, utilization: float = 1.0) -> list[Capacity]:
    """One `Capacity` per benchmark row at output `size` (rows of other sizes are skipped)."""
    if not 0 < utilization <= 1:
        from qie.errors import InvalidRequestError

        raise InvalidRequestError("utilization", utilization, "give a share of the day from 0 (excluded) to 1")
    return [
        Capacity(str(row.get("name")), size, edit_seconds(row, "fast"), edit_seconds(row, "quality"), utilization)
        for row in rows
        if int(row.get("size", 0)) == size
    ]


def report(benchmark: dict[str, Any], *, size: int = 1024, target: float = 100_000, utilization: float = 1.0) -> str:
    """The capacity table as text (markdown), labelled as placeholder when the input is."""
    meta = benchmark.get("meta", {})
    label = " [PLACEHOLDER anchors, not a benchmark run]" if meta.get("placeholder") else ""
    lines = [
        f"Capacity at {size}x{size} on {meta.get('device') or 'unknown device'}"
        f" ({meta.get('date', 'no date')}, utilization {utilization:.0%}){label}",
        "",
        f"| configuration | fast s/edit | fast images/day | replicas for {target:,.0f}/day"
        f" | quality s/edit | quality images/day | replicas for {target:,.0f}/day |",
        "|---|---|---|---|---|---|---|",
    ]
    for cap in capacity(benchmark.get("rows", []), size=size, utilization=utilization):
        lines.append(
            f"| {cap.name} | {_num(cap.fast_s, '.2f')} | {_num(cap.fast_per_day, ',.0f')}"
            f" | {_num(cap.replicas('fast', target), 'd')} | {_num(cap.quality_s, '.2f')}"
            f" | {_num(cap.quality_per_day, ',.0f')} | {_num(cap.replicas('quality', target), 'd')} |"
        )
    batching = [r for r in benchmark.get("batching", []) if int(r.get("width", 0)) * int(r.get("height", 0)) == size**2]
    if batching:
        lines += ["", "| batch | steps | CFG | images/day per GPU | vs batch 1 |", "|---|---|---|---|---|"]
        for r in batching:
            per_day = r["images_per_hour"] * 24 * utilization
            speedup = r.get("speedup_vs_batch1")
            lines.append(
                f"| {r['batch']} | {r['steps']} | {r['true_cfg_scale']} | {per_day:,.0f} | {_num(speedup, '.2f')}x |"
            )
    return "\n".join(lines)


def _num(value: float | int | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.capacity [BENCHMARK.json] [--size 1024] [--target 100000] [--utilization 1.0]`."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.capacity", description=__doc__.split("\n")[0])
    parser.add_argument("benchmark", nargs="?", help="benchmark JSON (default: the placeholder anchors)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--target", type=float, default=100_000, help="edits per day to serve")
    parser.add_argument("--utilization", type=float, default=1.0, help="busy share of a replica's day (0-1]")
    args = parser.parse_args(argv)
    data = json.loads(Path(args.benchmark).read_text()) if args.benchmark else PLACEHOLDER
    print(report(data, size=args.size, target=args.target, utilization=args.utilization))
    return 0


if __name__ == "__main__":
    sys.exit(main())
