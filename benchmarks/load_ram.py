"""Host RAM of loading a saved pipeline (memory-mapped weights) and of what comes after, on CPU.

`load_pipeline` on a local folder memory-maps the safetensors files: the weights are file pages
(RssFile: page cache the kernel can drop and read again), not anonymous memory (RssAnon: what has
to fit in RAM or swap). The mappings are private, so anything that writes a weight in place
copies its pages (they turn anonymous), and anything that makes a new tensor (a dtype cast, a
clone, a packed copy) is anonymous too. Each case runs in a fresh subprocess that samples
/proc/self/status (RssAnon, RssFile, VmRSS) every 20 ms:

- load: `qie.core.models.load_pipeline(folder)` on CPU in bf16 (what qie does);
- lora_fused: load, then a random LoRA of the Lightning files' key format and shapes
  (`random_lightning_lora`) fused into the transformer the way qie does at load
  (`setup_speed(..., fast_lora=..., fast_fuse=True)`: diffusers' `fuse_lora` + `unload_lora_weights`);
- read_all: load, then every transformer parameter read once (a sum): file pages only;
- stream_pack: load, then the stream plan's packing (`BlockStreamer`, fp8 storage) with no block
  resident, so every block's packed fp8 copy is host memory (on a GPU it would be pinned).

The model is the full-width random pipeline of `benchmarks.random_model`, shallower (by default 6
transformer blocks, 4 text and 4 vision layers: 8.1 GiB in bf16), saved to a folder.

    python3 -m benchmarks.load_ram --out benchmarks [--layers 6] [--model-dir DIR]

writes `load-ram-cpu.json` into `--out` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.profiling import proc_status

GIB = 2**30
ROOT = Path(__file__).resolve().parents[1]
CASES = ("load", "lora_fused", "read_all", "stream_pack")
COMPONENTS = ("transformer", "text_encoder", "vae")
STATUS_KEYS = ("RssAnon", "RssFile", "VmRSS")
LORA_FILE = "lightning-random.safetensors"
SAMPLE_S = 0.02  # seconds between two reads of /proc/self/status


# ---------------------------------------------------------------- the model


def build_model(folder: str | Path, layers: int = 6, text_layers: int = 4, vision_depth: int = 4) -> Path:
    """Save the full-width random pipeline, `layers` transformer blocks deep, in bf16 to `folder`."""
    import torch

    from benchmarks.random_model import build_random_pipeline

    pipe = build_random_pipeline(
        "cpu", torch.bfloat16, transformer_layers=layers, text_layers=text_layers, vision_depth=vision_depth
    )
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def model_layers(folder: str | Path) -> int:
    return json.loads((Path(folder) / "transformer" / "config.json").read_text())["num_layers"]


def write_lora(folder: str | Path, path: str | Path) -> Path:
    """A random Lightning-format LoRA for the saved transformer (shapes from its config, no weights read)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    from qie.speed.fast_mode import random_lightning_lora

    config = QwenImageTransformer2DModel.load_config(Path(folder) / "transformer")
    with init_empty_weights():
        transformer = QwenImageTransformer2DModel.from_config(config)
    return random_lightning_lora(transformer, path, dtype=torch.bfloat16)


# ---------------------------------------------------------------- inside one case's process


class Sampler:
    """Peaks of `proc_status(STATUS_KEYS)`, sampled every `interval` seconds on a thread."""

    def __init__(self, interval: float = SAMPLE_S) -> None:
        self.interval = interval
        self.peak = dict.fromkeys(STATUS_KEYS, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for key, value in proc_status(STATUS_KEYS).items():
            self.peak[key] = max(self.peak[key], value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def weight_mappings() -> dict[str, dict[str, float]]:
    """Per mapped .safetensors file: its address ranges, and its Rss and Anonymous (copied-on-write) bytes."""
    maps: dict[str, dict[str, Any]] = {}
    current = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                current = None
                if len(head) >= 6 and head[5].endswith(".safetensors"):
                    start, end = (int(x, 16) for x in head[0].split("-"))
                    current = maps.setdefault(head[5], {"ranges": [], "rss": 0, "anon": 0})
                    current["ranges"].append((start, end))
            elif current is not None and head and head[0] in ("Rss:", "Anonymous:"):
                current["rss" if head[0] == "Rss:" else "anon"] += int(head[1]) * 1024
    return maps


def backing(module, maps: dict[str, dict[str, Any]]) -> dict[str, float]:
    """GiB of `module`'s parameters and how much of it lies in a mapped weight file (and both in bytes)."""
    ranges = [r for m in maps.values() for r in m["ranges"]]
    total = mapped = 0
    for p in module.parameters():
        n = p.numel() * p.element_size()
        ptr = p.data_ptr()
        total += n
        if any(a <= ptr < b for a, b in ranges):
            mapped += n
    return {
        "gib": round(total / GIB, 3),
        "in_mmap_gib": round(mapped / GIB, 3),
        "bytes": total,
        "in_mmap_bytes": mapped,
    }


def run_case(case: str, folder: str, lora: str | None = None) -> dict[str, Any]:
    """Run `case` in this process (a fresh one: see `measure_case`) and return its row."""
    import gc

    import torch

    from qie.core.models import load_pipeline

    if case not in CASES:
        raise ValueError(f"case={case!r}: one of {CASES}")
    cpu = torch.device("cpu")
    base = proc_status(STATUS_KEYS)
    note = ""
    with Sampler() as sampler:
        start = time.perf_counter()
        pipe = load_pipeline(folder, device=cpu, dtype=torch.bfloat16)
        load_s = time.perf_counter() - start
        after_load = proc_status(STATUS_KEYS)
        loaded_maps = weight_mappings()
        weights = {name: backing(getattr(pipe, name), loaded_maps) for name in COMPONENTS}
        start = time.perf_counter()
        if case == "lora_fused":
            from qie.core.speed_setup import setup_speed

            setup = setup_speed(pipe, cpu, torch.bfloat16, fast_lora=lora, fast_fuse=True)
            if setup.fast is None or not setup.fast.fused:
                raise RuntimeError(f"the LoRA was not fused: {setup.fast_unavailable}")
            note = "setup_speed(fast_lora=random Lightning-format LoRA, fast_fuse=True)"
        elif case == "read_all":
            with torch.no_grad():
                total = sum(float(p.sum(dtype=torch.float32)) for p in pipe.transformer.parameters())
            note = f"sum of every transformer parameter ({total:.3g})"
        elif case == "stream_pack":
            from qie.memory.streaming import BlockStreamer

            blocks = pipe.transformer.transformer_blocks
            streamer = BlockStreamer(blocks, cpu, resident=0, storage="fp8", compute_dtype=torch.bfloat16)
            packed = sum(b.numel() for b in streamer.buffers) / GIB
            note = f"BlockStreamer(resident=0, storage='fp8'): {packed:.3f} GiB packed, compute={streamer.compute}"
        step_s = time.perf_counter() - start
        gc.collect()
        time.sleep(0.1)  # one more sample after the work
    after = proc_status(STATUS_KEYS)
    maps = weight_mappings()
    return {
        "case": case,
        "peak_rss_anon_gib": round(sampler.peak["RssAnon"], 3),
        "peak_rss_file_gib": round(sampler.peak["RssFile"], 3),
        "peak_vm_rss_gib": round(sampler.peak["VmRSS"], 3),
        "rss_anon_base_gib": round(base["RssAnon"], 3),
        "rss_anon_after_load_gib": round(after_load["RssAnon"], 3),
        "rss_anon_after_gib": round(after["RssAnon"], 3),
        "rss_file_after_gib": round(after["RssFile"], 3),
        "step_anon_gib": round(after["RssAnon"] - after_load["RssAnon"], 3),
        "mmap_cow_gib": round(sum(m["anon"] for m in maps.values()) / GIB, 3),
        "mmap_cow_bytes": sum(m["anon"] for m in maps.values()),
        "load_s": round(load_s, 2),
        "step_s": round(step_s, 2),
        "weights_after_load": weights,
        "weights_after": {name: backing(getattr(pipe, name), maps) for name in COMPONENTS},
        "note": note,
    }


# ---------------------------------------------------------------- the parent


def measure_case(case: str, folder: str | Path, lora: str | Path | None = None, timeout: float = 1800) -> dict:
    """Run `case` on the saved pipeline in `folder` in a fresh Python process; return its row."""
    cmd = [sys.executable, "-m", "benchmarks.load_ram", "--case", case, "--model-dir", str(folder)]
    if lora is not None:
        cmd += ["--lora", str(lora)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"case {case} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(folder: str | Path, cases: tuple[str, ...] = CASES) -> list[dict]:
    """One row per case, each from its own process; the LoRA is written once, beside nothing of the model."""
    with tempfile.TemporaryDirectory(prefix="qie-load-ram-lora-") as tmp:
        lora = write_lora(folder, Path(tmp) / LORA_FILE) if "lora_fused" in cases else None
        return [measure_case(case, folder, lora if case == "lora_fused" else None) for case in cases]


def host_ram_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) * 1024 / GIB, 1)
    return 0.0


def meta(folder: str | Path, rows: list[dict]) -> dict[str, Any]:
    import diffusers
    import safetensors
    import torch
    import transformers

    loaded = next((r for r in rows if r["case"] == "load"), rows[0])
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "host_ram_gib": host_ram_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "layers": model_layers(folder),
        "weights_gib": {name: w["gib"] for name, w in loaded["weights_after_load"].items()},
        "sampling_ms": round(SAMPLE_S * 1000),
        "dtype": "bfloat16",
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| case | peak RssAnon | peak RssFile | RssAnon after load | RssAnon after | step ΔRssAnon "
        "| copied-on-write in mmap | transformer in mmap after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["weights_after"]["transformer"]
        lines.append(
            f"| {r['case']} | {r['peak_rss_anon_gib']:.2f} | {r['peak_rss_file_gib']:.2f} "
            f"| {r['rss_anon_after_load_gib']:.2f} | {r['rss_anon_after_gib']:.2f} | {r['step_anon_gib']:+.2f} "
            f"| {r['mmap_cow_gib']:.2f} | {t['in_mmap_gib']:.2f} of {t['gib']:.2f} |"
        )
    return "\n".join(lines) + "\n\n(GiB)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.load_ram", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for load-ram-cpu.json")
    parser.add_argument("--layers", type=int, default=6, help="transformer blocks of the built model (default 6)")
    parser.add_argument("--model-dir", help="use (or build and keep) the saved model here; default: a temp dir")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in this process
    parser.add_argument("--lora", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.model_dir, args.lora)))
        return 0
    if not args.out:
        parser.error("--out is required")
    folder = Path(args.model_dir) if args.model_dir else Path(tempfile.mkdtemp(prefix="qie-load-ram-"))
    try:
        if not (folder / "model_index.json").is_file():
            print(f"building the {args.layers}-block random pipeline in {folder} ...", file=sys.stderr)
            build_model(folder, layers=args.layers)
        elif model_layers(folder) != args.layers:
            print(f"note: {folder} has {model_layers(folder)} transformer blocks (--layers ignored)", file=sys.stderr)
        rows = measure(folder)
        report = {"meta": meta(folder, rows), "rows": rows}
    finally:
        if not args.model_dir:
            shutil.rmtree(folder, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load-ram-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
