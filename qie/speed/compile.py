"""Regional `torch.compile` of the transformer block, with an on-disk cache and size buckets.

Only the repeated `QwenImageTransformerBlock` is compiled (diffusers' `compile_repeated_blocks`):
one graph serves all 60 blocks, so compiling takes about a minute instead of many. Inductor's
caches go to `cache_dir` (default `$QIE_CACHE/inductor`), so a restart reuses the compiled code.
Every new sequence length can trigger a recompile, so with compile on, output sizes snap to a
fixed set of buckets (`snap_to_bucket`).

This replaces exporting the pipeline to ONNX/TensorRT: the pipeline's dynamic parts (the
Qwen2.5-VL encoder with images, variable text length, 3-D RoPE tables) do not export as a whole,
and regional compile reaches the same kernels (fused norms/modulation, cuBLAS/cuDNN matmuls and
attention) without a second model format to keep in sync.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from qie.settings import read as read_setting

log = logging.getLogger(__name__)


def set_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Point Inductor's FX-graph and autotune caches at `cache_dir` (created if missing)."""
    path = Path(cache_dir or read_setting("cache_dir") / "inductor")
    path.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return path


def compile_blocks(transformer: torch.nn.Module, cache_dir: str | os.PathLike | None = None) -> bool:
    """Compile the repeated blocks of `transformer`; False (and a warning) if that is not possible."""
    set_cache_dir(cache_dir)
    try:
        transformer.compile_repeated_blocks(fullgraph=True)
    except Exception as exc:  # compile support varies with torch/diffusers builds
        log.warning("regional compile unavailable (%s: %s); running eager", type(exc).__name__, exc)
        return False
    return True


def uncompile_blocks(transformer: torch.nn.Module) -> None:
    """Undo `compile_blocks` (e.g. after a failed warm-up): blocks run eager again."""
    for module in transformer.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    torch._dynamo.reset()
