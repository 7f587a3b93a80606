"""Where a transformer forward's time goes on the GPU: matrix work, host-to-device copies, or neither.

`profile_forward` replays one captured transformer call and splits its time three ways: the wall
time of one forward, the summed duration of its GPU kernels, and the summed duration of its
host-to-device copies. Compared, they name the bound: wall ≈ kernels means compute-bound;
wall ≈ kernels + copies means the copies do not overlap with the compute; wall ≈ copies means
PCIe-bound; wall well above both means the host (Python, launches, synchronization) is the limit,
and `host_top_s` lists where the host spent its time.

Example:
    >>> summary = profile_forward(pipe.transformer, lambda: editor.edit(request))  # doctest: +SKIP
    >>> summary["forward_s"], summary["kernel_s"], summary["h2d_s"]  # doctest: +SKIP
"""

from __future__ import annotations

import gc
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

# Kineto leaves NVIDIA's CUPTI attached after a profile ends unless told to tear it down
# (pytorch/pytorch#144455), and every later kernel launch then costs more host time. Host-bound
# stages show it: the fast rows' text encode (~2,800 launches) took 0.14-0.17 s after the stock
# section's profiles (h200-ab) and 0.08 s with no profile before them (h200-ae). Every benchmark
# imports this module before it profiles.
os.environ.setdefault("TEARDOWN_CUPTI", "1")


def cuda_sync() -> None:
    """Wait for the GPU's queued work, when there is a GPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def capture_call(module: torch.nn.Module, trigger: Callable[[], Any]) -> tuple[tuple, dict]:
    """The positional and keyword arguments of `module`'s first call while `trigger()` runs."""
    calls: list[tuple[tuple, dict]] = []

    def grab(mod, args, kwargs):
        if not calls:
            calls.append((args, dict(kwargs)))

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        trigger()
    finally:
        handle.remove()
    if not calls:
        raise RuntimeError(f"{type(module).__name__} was not called by the trigger")
    return calls[0]


# Kernel-name patterns by category, tried in this order (first match wins). Device kernels come
# from cuBLAS/cuBLASLt (`nvjet_*`, `sm90_xmma_gemm_*`, `cutlass*`), cuDNN/flash/FA3 attention,
# PyTorch's own kernels and Inductor's Triton kernels (named after the aten ops they fuse:
# `triton_red_fused_..._native_layer_norm_0`, `triton_tem_fused_mm_0` for an autotuned GEMM
# template); CPU runs see aten op names instead.
_ATTENTION = r"flash|fmha|sdpa|scaled_dot_product|attention|attn|flex_attention|sageattn"
_GEMM = (
    r"gemm|nvjet|xmma|cutlass|cublas|splitkreduce|gemv|_tem_fused_(mm|addmm|bmm|_scaled_mm)"
    r"|^aten::(mm|addmm|bmm|baddbmm|matmul|linear|_scaled_mm)$"
)
_QUANTIZE = r"float8|fp8|e4m3|e5m2|amax|quantiz"
_COPIES = (
    r"memcpy|memset|copy_kernel|catarraybatchedcopy|direct_copy"
    r"|^aten::(copy_|_to_copy|to|cat|clone|contiguous|stack|index_select)$"
)
_ELEMENTWISE = (
    r"elementwise|vectorized|layer_norm|rms_norm|layernorm|rmsnorm|rowwisemoments|reduce_kernel|softmax|gelu|silu"
    r"|qk_norm_rope|^triton_|^aten::(add|add_|mul|mul_|sub|div|div_|pow|rsqrt|mean|sum|exp|sin|cos|neg|tanh|where|addcmul|lerp"
    r"|native_layer_norm|layer_norm|rms_norm|_fused_rms_norm|gelu|silu|sigmoid|fill_|clamp|view_as_complex|view_as_real)$"
)
# Inductor names a kernel after every aten op it fuses, the attention op its output feeds included; only
# a template kernel (`triton_tem_fused_flex_attention_0`) runs the attention itself.
_INDUCTOR_AROUND_ATTENTION = re.compile(r"^triton_(poi|red|per)_fused_.*(flash|attn|attention|sdpa)", re.I)
_ATTENTION_OPS = re.compile(r"_(flash_attn_forward|scaled_dot_product_\w+?_attention|attention|sdpa)(?=_)", re.I)
PATTERNS = [
    ("attention", re.compile(_ATTENTION, re.I)),
    ("gemm", re.compile(_GEMM, re.I)),
    ("quantize", re.compile(_QUANTIZE, re.I)),
    ("copies", re.compile(_COPIES, re.I)),
    ("elementwise", re.compile(_ELEMENTWISE, re.I)),
]
CATEGORIES = ("gemm", "attention", "elementwise", "quantize", "copies", "other")
_COPY_OPS = {"", "to", "copy", "clone", "cat", "view", "permute", "transpose", "unsqueeze", "expand", "slice"}
# Not work: the profiler's own markers and the host side of CUDA calls.
_SKIP = re.compile(r"^(ProfilerStep|\[memory\]|cuda[A-Z]|cu[A-Z]|Torch-Compiled Region|CompiledFunction)|^## ")


def classify(name: str) -> str:
    """The kernel category of a device kernel's or aten op's name (see `CATEGORIES`).

    Example:
        >>> classify("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_cublas")
        'gemm'
        >>> classify("triton_poi_fused__to_copy_clone_3")
        'copies'
    """
    if _is_copy_only_triton(name):
        return "copies"
    if _INDUCTOR_AROUND_ATTENTION.match(name):  # names the attention op it feeds; its work is elementwise
        return _classify_fused_ops(name)
    for category, pattern in PATTERNS:
        if pattern.search(name):
            return category
    return "other"


def _classify_fused_ops(name: str) -> str:
    """An Inductor kernel fused into an attention op's inputs (`triton_poi_fused__flash_attn_forward__to_copy_
    cat_clamp_..._0`: the fp8 cast of the values), classified by the other ops it fuses."""
    rest = _ATTENTION_OPS.sub("", name)
    if "_clamp_" in rest and "_to_copy_" in rest:  # a saturating cast: the fp8 inputs
        return "quantize"
    for category, pattern in PATTERNS:
        if category != "attention" and pattern.search(rest):
            return category
    return "other"


def _is_copy_only_triton(name: str) -> bool:
    """An Inductor kernel that fuses nothing but layout and dtype copies (`triton_poi_fused__to_copy_clone_3`)."""
    match = re.fullmatch(r"triton_[a-z]+_fused_(.*?)_?\d*", name)
    return bool(match) and bool(match.group(1).strip("_")) and set(match.group(1).split("_")) <= _COPY_OPS


def split_device_time(events: Any) -> dict[str, Any]:
    """Sum a profiler's `key_averages()` into kernel and host-to-device copy time (seconds), the number of
    kernels launched (a replayed CUDA graph leaves a gap of a few microseconds between two), and the top kernels."""
    kernels: dict[str, float] = {}
    h2d = other_copies = 0.0
    launches = 0
    for e in events:
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        us = _self_us(e)
        key = e.key.lower()
        if "memcpy htod" in key:
            h2d += us
        elif "memcpy" in key or "memset" in key:
            other_copies += us
        else:
            kernels[e.key] = kernels.get(e.key, 0.0) + us
            launches += getattr(e, "count", 1)
    top = sorted(sum_by_prefix(kernels.items()).items(), key=lambda kv: -kv[1])[:16]
    return {
        "kernel_s": sum(kernels.values()) / 1e6,
        "kernels": float(launches),
        "h2d_s": h2d / 1e6,
        "other_copies_s": other_copies / 1e6,
        "top_kernels_s": {k: round(v / 1e6, 4) for k, v in top},
    }


def sum_by_prefix(items: Iterable[tuple[str, float]], chars: int = 80) -> dict[str, float]:
    """Values summed per name cut to its first `chars` characters (kernel names that long differ only in
    template arguments), so that two such kernels add up instead of one hiding the other.

    Example:
        >>> sum_by_prefix([("kernel<a>", 1.0), ("kernel<b>", 2.0), ("other", 1.0)], chars=6)
        {'kernel': 3.0, 'other': 1.0}
    """
    out: dict[str, float] = {}
    for name, value in items:
        out[name[:chars]] = out.get(name[:chars], 0.0) + value
    return out


def _self_us(event: Any) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def split_categories(events: Any) -> dict[str, Any]:
    """Seconds per kernel category in a profiler's `key_averages()`, the busy time, and the top "other" names.

    GPU kernels when the profile has any; otherwise (a CPU run) the self time of the aten ops.
    """
    rows = list(events)
    on_device = [e for e in rows if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    items = [(e.key, _self_us(e)) for e in on_device] or [
        (e.key, e.self_cpu_time_total) for e in rows if not _SKIP.search(e.key)
    ]
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    other: list[tuple[str, float]] = []
    for name, us in items:
        category = classify(name)
        seconds[category] += us / 1e6
        if category == "other":
            other.append((name, us / 1e6))
    top_other = dict(sorted(sum_by_prefix(other).items(), key=lambda kv: -kv[1])[:8])
    return {
        "categories_s": seconds,
        "busy_s": sum(seconds.values()),
        "other_top_s": top_other,
        "on_device": bool(on_device),
    }


def device_busy_s(events: Any) -> float | None:
    """The union of the GPU kernels' time intervals in a profiler's `events()` (seconds); None without any.

    Kernels on several streams overlap; their union is the time the GPU had work at all.
    """
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA and hasattr(e, "time_range")
    )
    if not spans:
        return None
    total, (lo, hi) = 0.0, spans[0]
    for start, end in spans[1:]:
        if start > hi:
            total, lo = total + hi - lo, start
        hi = max(hi, end)
    return (total + hi - lo) / 1e6


def profile_forward(
    module: torch.nn.Module, trigger: Callable[[], Any], repeats: int = 3, device_name: str | None = None
) -> dict[str, Any]:
    """Per forward of `module` (replaying its first call under `trigger`): wall, kernel and copy seconds,
    seconds by kernel category with idle time, the host's time by op, and (for the Qwen-Image transformer)
    each category's floor.

    `device_name` picks the peak rates of the floors (`benchmarks.floors.peaks_for`; default: this GPU).
    """
    from torch.profiler import ProfilerActivity, profile

    args, kwargs = capture_call(module, trigger)
    with torch.no_grad():
        module(*args, **kwargs)  # warm
        cuda_sync()
        start = time.perf_counter()
        for _ in range(repeats):
            module(*args, **kwargs)
        cuda_sync()
        wall = (time.perf_counter() - start) / repeats
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            for _ in range(repeats):
                module(*args, **kwargs)
            cuda_sync()
    averages = prof.key_averages()
    split = split_device_time(averages)
    per = {k: (v / repeats if isinstance(v, float) else v) for k, v in split.items()}
    per["top_kernels_s"] = {k: round(v / repeats, 4) for k, v in split["top_kernels_s"].items()}
    summary = {"forward_s": wall, **per, **category_summary(averages, prof.events(), wall, repeats)}
    summary.update(host_time(averages, repeats))
    if split["kernels"] and torch.cuda.is_available():
        summary["block_kernels"] = block_sequence(split_spans(prof.events())[0])
    floor = floors_for_call(module, args, kwargs, device_name)
    if floor:
        summary.update(floor)
        summary["over_floor_s"] = {
            k: round(summary["categories_s"][k] - floor["floors_s"][k], 4) for k in summary["categories_s"]
        }
    return summary


def host_time(averages: Any, repeats: int, top: int = 10) -> dict[str, Any]:
    """Per forward: the host's self time in a profiler's `key_averages()` (ops, compiled regions, CUDA
    runtime calls such as kernel launches), in total and for the `top` largest, in seconds.

    Where a forward's wall time exceeds its kernels' (idle), this says what the host was doing.
    """
    rows = [
        (e.key, e.self_cpu_time_total)
        for e in averages
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CPU and e.self_cpu_time_total > 0
    ]
    largest = sorted(rows, key=lambda r: -r[1])[:top]
    return {
        "host_s": round(sum(us for _, us in rows) / 1e6 / repeats, 5),
        "host_top_s": {k[:80]: round(us / 1e6 / repeats, 5) for k, us in largest},
    }


def host_calls(fn: Callable[[], Any], lines: int = 30, chars: int = 6000) -> dict[str, str]:
    """One call of `fn` under cProfile: the `lines` largest host functions by own time (`cprofile_tottime`)
    and by cumulative time (`cprofile_cumulative`), each report's last `chars` characters.

    Example:
        >>> report = host_calls(lambda: sum(range(10)))
        >>> sorted(report)
        ['cprofile_cumulative', 'cprofile_tottime']
    """
    import cProfile
    import io
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    try:
        fn()
    finally:
        profile.disable()
    out = {}
    for key in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats(key).print_stats(lines)
        out[f"cprofile_{key}"] = text.getvalue()[-chars:]
    return out


def category_summary(averages: Any, events: Any, wall_s: float, repeats: int) -> dict[str, Any]:
    """`split_categories` per forward, with `idle` = wall time the GPU (on CPU: the ops) had no work."""
    split = split_categories(averages)
    busy = device_busy_s(events) if split["on_device"] else None
    busy = (busy if busy is not None else split["busy_s"]) / repeats
    seconds = {k: round(v / repeats, 5) for k, v in split["categories_s"].items()}
    seconds["idle"] = round(max(0.0, wall_s - busy), 5)
    return {
        "categories_s": seconds,
        "busy_s": busy,
        "other_top_s": {k: round(v / repeats, 5) for k, v in split["other_top_s"].items()},
    }


def floors_for_call(module: torch.nn.Module, args: tuple, kwargs: dict, device_name: str | None) -> dict[str, Any]:
    """The floors (`benchmarks.floors`) of a captured transformer call; empty for other modules."""
    from benchmarks.floors import floors, forward_counts, peaks_for

    hidden = kwargs.get("hidden_states", args[0] if args else None)
    text = kwargs.get("encoder_hidden_states")
    if not hasattr(module, "transformer_blocks") or hidden is None or text is None:
        return {}
    counts = forward_counts(module, hidden.shape[1], text.shape[1], batch=hidden.shape[0])
    if device_name is None and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name()
    peaks = peaks_for(device_name)
    return {
        "counts": counts.as_dict(),
        "peaks": peaks.name,
        "floors_s": floors(counts, peaks),
    }


def reset_host_peak() -> bool:
    """Restart the process's resident-memory high-water mark (Linux `/proc/self/clear_refs`); False elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def proc_status(keys: Sequence[str]) -> dict[str, float]:
    """The memory fields `keys` of this process's `/proc/self/status` (e.g. "VmHWM", "RssAnon") in GiB.

    Raises OSError where there is no such file (not Linux).

    Example:
        >>> sorted(proc_status(("RssAnon", "RssFile")))  # doctest: +SKIP
        ['RssAnon', 'RssFile']
    """
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0]) * 1024 / 2**30
    return out


def host_peak_gib() -> float | None:
    """The process's resident host-memory high-water mark (`VmHWM`) in GiB, since start or `reset_host_peak`."""
    try:
        return proc_status(("VmHWM",)).get("VmHWM")
    except OSError:
        return None


class GcPauses:
    """Python's garbage-collector pauses while in the `with` body: seconds and collections per generation.

    A process that compiled a model holds millions of objects, so a full collection can take a
    large part of a stage that allocates many small Python objects (a text encoder's forward).

    Example:
        >>> with GcPauses() as pauses:
        ...     _ = [[i] for i in range(100_000)]
        >>> pauses.collections[0] > 0
        True
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = {0: 0, 1: 0, 2: 0}
        self._start: float | None = None

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.collections[info["generation"]] += 1
            self._start = None

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict[str, Any]:
        return {"gc_s": self.seconds, "gc_collections": dict(self.collections)}


def gpu_idle(fn: Callable[[], Any], min_gap_ms: float = 0.05, top: int = 10) -> dict[str, Any]:
    """One call of `fn` (an edit) under the profiler: where the GPU had no work, by the edit's stages
    (the `qie.<stage>` ranges `StageTimer` opens) and its `top` longest gaps (`idle_report`).
    Off CUDA: {"on_device": False}."""
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return {"on_device": False}
    cuda_sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        cuda_sync()
    device, stages, host = split_spans(prof.events())
    return {"on_device": True, **idle_report(device, stages, host, min_gap_ms=min_gap_ms, top=top)}


Span = tuple[float, float, str]


def split_spans(events: Iterable[Any]) -> tuple[list[Span], list[Span], list[Span]]:
    """A profiler's events as (start_us, end_us, name) spans of GPU work, of the edit's stages (the
    `qie.<stage>` ranges, named without the prefix) and of host ops. A range's GPU-side span (a stage,
    Inductor's "## Call CompiledFxGraph ##") is not GPU work: it would cover the idle time inside it."""
    from qie.telemetry import STAGE_RANGE

    device: list[Span] = []
    stages: list[Span] = []
    host: list[Span] = []
    for event in events:
        span = (event.time_range.start, event.time_range.end)
        stage = event.name.startswith(STAGE_RANGE)
        if event.device_type == torch.autograd.DeviceType.CUDA:
            if not (stage or getattr(event, "is_user_annotation", False)):
                device.append((*span, event.name))
        elif stage:
            stages.append((*span, event.name[len(STAGE_RANGE) :]))
        else:
            host.append((*span, event.name))
    return device, stages, host


def block_sequence(device: Sequence[Span], chars: int = 48) -> dict[str, Any]:
    """One transformer block's kernels in launch order, from the middle of a profiled forward: from one
    attention kernel up to the next, each as [name, microseconds, idle microseconds before it], with the
    totals (where a block's launches and the gaps between them go).

    Example:
        >>> spans = [(0.0, 50.0, "flash"), (52.0, 60.0, "gemm_a"), (65.0, 70.0, "triton_b"), (71.0, 99.0, "flash")]
        >>> r = block_sequence(spans)
        >>> r["kernels"], r["busy_us"], r["gap_us"], r["sequence"][2]
        (3, 63.0, 7.0, ['triton_b', 5.0, 5.0])
    """
    ordered = sorted(device)
    marks = [i for i, (_, _, name) in enumerate(ordered) if classify(name) == "attention"]
    if len(marks) < 2:
        return {"note": "fewer than two attention kernels in the trace"}
    middle = len(marks) // 2
    sequence = []
    for i in range(marks[middle - 1], marks[middle]):
        start, end, name = ordered[i]
        gap = max(0.0, start - ordered[i - 1][1]) if i else 0.0  # streams may overlap: no negative gaps
        sequence.append([name[:chars], round(end - start, 1), round(gap, 1)])
    return {
        "kernels": len(sequence),
        "busy_us": round(sum(row[1] for row in sequence), 1),
        "gap_us": round(sum(row[2] for row in sequence), 1),
        "sequence": sequence,
    }


def idle_report(
    device: Sequence[Span],
    stages: Sequence[Span],
    host: Sequence[Span],
    *,
    min_gap_ms: float = 0.05,
    top: int = 10,
) -> dict[str, Any]:
    """Where the GPU idled between the first stage's start and the last stage's end, from (start_us,
    end_us, name) spans of GPU work, stages and host ops: idle and wall ms per stage (a gap counts in
    the stage its start lies in, "between stages" outside them), the gaps of at least `min_gap_ms`,
    and the `top` longest with the kernels on either side and the host ops that overlapped them most
    (host work outside any op or `qie:` range, such as PIL, leaves `host_ops` short of the gap's `ms`).

    Example:
        >>> r = idle_report([(0, 100, "a"), (300, 400, "b")], [(0, 400, "denoise")], [(120, 280, "aten::randn")])
        >>> r["idle_ms"], r["gaps"][0]["after"], r["gaps"][0]["host_ops"]
        (0.2, 'b', {'aten::randn': 0.16})
    """
    if not stages:
        return {"idle_ms": None, "note": "no stage ranges in the trace"}
    lo, hi = min(s[0] for s in stages), max(s[1] for s in stages)
    busy: list[list[Any]] = []  # merged [start, end, first kernel, last kernel]
    for start, end, name in sorted(d for d in device if d[1] > lo and d[0] < hi):
        if busy and start <= busy[-1][1]:
            if end > busy[-1][1]:
                busy[-1][1], busy[-1][3] = end, name
        else:
            busy.append([start, end, name, name])
    gaps, cursor, before = [], lo, ""
    for start, end, first, last in busy + [[hi, hi, "", ""]]:
        if start - cursor >= min_gap_ms * 1e3:
            gaps.append((cursor, min(start, hi), before, first))
        cursor, before = max(cursor, end), last
    ordered = sorted(stages)

    def stage_at(t: float) -> str:
        return next((name for s, e, name in ordered if s <= t < e), "between stages")

    by_stage: dict[str, dict[str, float]] = {name: {"idle_ms": 0.0, "wall_ms": 0.0} for _, _, name in ordered}
    by_stage["between stages"] = {"idle_ms": 0.0, "wall_ms": 0.0}
    for s, e, name in ordered:
        by_stage[name]["wall_ms"] += (e - s) / 1e3
    for s, e, _, _ in gaps:
        by_stage[stage_at(s)]["idle_ms"] += (e - s) / 1e3
    longest = []
    for s, e, before_name, after_name in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        overlap: dict[str, float] = {}
        for hs, he, name in host:
            covered = min(he, e) - max(hs, s)
            if covered > 0:
                overlap[name] = overlap.get(name, 0.0) + covered / 1e3
        ops = dict(sorted(overlap.items(), key=lambda kv: -kv[1])[:3])
        longest.append(
            {
                "stage": stage_at(s),
                "at_ms": round((s - lo) / 1e3, 3),
                "ms": round((e - s) / 1e3, 3),
                "before": before_name[:60],
                "after": after_name[:60],
                "host_ops": {k[:60]: round(v, 3) for k, v in ops.items()},
            }
        )
    return {
        "wall_ms": round((hi - lo) / 1e3, 3),
        "idle_ms": round(sum(e - s for s, e, _, _ in gaps) / 1e3, 3),
        "gap_count": len(gaps),
        "by_stage": {
            k: {m: round(v, 3) for m, v in d.items()} for k, d in by_stage.items() if d["wall_ms"] or d["idle_ms"]
        },
        "gaps": longest,
    }
