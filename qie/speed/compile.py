"""Regional `torch.compile` of the transformer block, with an on-disk cache and size buckets.

Only the repeated `QwenImageTransformerBlock` is compiled (diffusers' `compile_repeated_blocks`):
one graph serves all 60 blocks, so compiling takes about a minute instead of many. Inductor's
caches go to `cache_dir` (default `$QIE_CACHE/inductor`), so a restart reuses the compiled code.
The blocks are traced dynamic in the image and text token counts from their first call
(`mark_token_dims`), so other output sizes and prompt lengths reuse the graph; only the batch size
(one or both CFG branches per call) gets a graph of its own. With compile on, output sizes still
snap to a fixed set of buckets (`snap_to_bucket`), which bounds what CUDA-graph modes record.

This replaces exporting the pipeline to ONNX/TensorRT: the pipeline's dynamic parts (the
Qwen2.5-VL encoder with images, variable text length, 3-D RoPE tables) do not export as a whole,
and regional compile reaches the same kernels (fused norms/modulation, cuBLAS/cuDNN matmuls and
attention) without a second model format to keep in sync.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from qie.errors import InvalidRequestError
from qie.settings import read as read_setting
from qie.speed import block_prologue, qk_prologue, rope
from qie.speed.options import COMPILE_MODES, VAE_COMPILE_MODES

log = logging.getLogger(__name__)


def set_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Point Inductor's FX-graph and autotune caches at `cache_dir` (created if missing)."""
    path = Path(cache_dir or read_setting("cache_dir") / "inductor")
    path.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return path


# `torch.compile` modes for the regional compile: Inductor's defaults; GEMM autotuning (minutes more
# of warm-up); CUDA graphs ("reduce-overhead": one graph replay per block call, no launch overhead,
# memory for the graphs' pools); both. Each new size records new graphs, hence the size buckets.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_mode(mode: str, name: str = "compile_mode") -> str:
    """`mode` if it is one of `COMPILE_MODES`, else `InvalidRequestError` naming `name`."""
    if mode not in COMPILE_MODES:
        raise InvalidRequestError(name, mode, f"use one of {', '.join(COMPILE_MODES)}")
    return mode


def check_vae_mode(mode: str) -> str:
    """`mode` if the VAE's compile can take it (a `VAE_COMPILE_MODES` value but "auto", which
    `Editor.load` resolves), else `InvalidRequestError` naming `vae_compile`."""
    if mode not in VAE_COMPILE_MODES or mode == "auto":
        choices = ", ".join(m for m in VAE_COMPILE_MODES if m != "auto")
        raise InvalidRequestError("vae_compile", mode, f"use one of {choices}")
    return mode


def compile_blocks(
    transformer: torch.nn.Module, cache_dir: str | os.PathLike | None = None, mode: str = "default"
) -> bool:
    """Compile the repeated blocks of `transformer` with `torch.compile` `mode`; False (and a warning) if not possible.

    With a CUDA-graph mode, each transformer call starts a new CUDA-graph step
    (`torch.compiler.cudagraph_mark_step_begin`): the previous call's graph outputs have been consumed
    by then, and without it the second CFG branch would find them overwritten.

    Blocks placed by a `BlockStreamer` (the stream plan) get `compile_streamed_blocks`; their weights
    move between calls, so CUDA-graph modes fall back to "default" there (logged).

    The rotary embedding switches to real arithmetic (`qie.speed.rope`): complex multiplication
    would fall back to eager kernels inside every block. With CUDA and Triton, the q/k norms, RoPE
    and the text+image join then run as one kernel per stream (`qie.speed.qk_prologue`), and blocks
    with fp8 projections normalize, modulate and quantize each stream in one kernel
    (`qie.speed.block_prologue`).

    Example:
        >>> compile_blocks(pipe.transformer, mode="max-autotune-no-cudagraphs")  # doctest: +SKIP
        True
    """
    check_mode(mode)
    set_cache_dir(cache_dir)
    blocks = getattr(transformer, "transformer_blocks", None)
    rope.install(transformer)
    if qk_prologue.available():
        qk_prologue.install(transformer)
        block_prologue.install(transformer)  # fp8 blocks only: their norms hand fp8 rows to the projections
    mark_token_dims(transformer)  # after rope.install: its hook makes the tensors the blocks receive
    try:
        if getattr(blocks, "qie_streamer", None) is not None:
            if mode in CUDA_GRAPH_MODES:
                log.warning(
                    "compile mode %r records CUDA graphs, which need fixed weight addresses; "
                    "streamed blocks compile with mode 'default'",
                    mode,
                )
                mode = "default"
            compile_streamed_blocks(blocks, mode=mode)
        else:
            transformer.compile_repeated_blocks(fullgraph=True, **compile_kwargs(transformer, mode))
    except Exception as exc:  # compile support varies with torch/diffusers builds
        log.warning("regional compile unavailable (%s: %s); running eager", type(exc).__name__, exc)
        unmark_token_dims(transformer)
        block_prologue.uninstall(transformer)
        qk_prologue.uninstall(transformer)
        rope.uninstall(transformer)
        return False
    if mode in CUDA_GRAPH_MODES and getattr(transformer, "_qie_graph_step", None) is None:
        transformer._qie_graph_step = transformer.register_forward_pre_hook(
            lambda *_: torch.compiler.cudagraph_mark_step_begin()
        )
    return True


def compile_kwargs(transformer: torch.nn.Module, mode: str) -> dict:
    """`torch.compile`'s mode for the blocks, or, for blocks quantized by `quantize_transformer`, the
    mode's options together with the Inductor options it recorded (`_qie_inductor_options`).

    Example:
        >>> compile_kwargs(torch.nn.Linear(2, 2), "reduce-overhead")
        {'mode': 'reduce-overhead'}
    """
    extra = getattr(transformer, "_qie_inductor_options", None)
    if not extra:
        return {"mode": mode}
    from torch._inductor import list_mode_options

    return {"options": {**list_mode_options(mode), **extra}}  # torch.compile takes a mode or options


def mark_token_dims(transformer: torch.nn.Module) -> bool:
    """Have the blocks traced dynamic in the image and text token counts from their first call.

    Dynamo traces a graph static in every size it first sees, and only at a call with another size
    traces it again, dynamic in that size: the first edit of another output size or prompt length
    paid a second compile, and the warm-up traced five graphs. Forward hooks on the modules that
    make the blocks' inputs (`img_in`, `txt_in`, the rotary `pos_embed`) mark their token
    dimension with `torch._dynamo.maybe_mark_dynamic`, and the prompt mask goes in as the bool
    tensor the transformer would make of it, marked too; 2511's per-token modulation index is
    named in `torch.compiler.config.dynamic_sources`. Marks do not change any arithmetic.
    False when `transformer` lacks those modules. Idempotent; `unmark_token_dims` removes them.

    Example:
        >>> mark_token_dims(pipe.transformer)  # doctest: +SKIP
        True
    """
    if getattr(transformer, "_qie_token_dims", None):
        return True
    modules = [getattr(transformer, name, None) for name in ("img_in", "txt_in", "pos_embed")]
    if any(m is None for m in modules):
        return False
    img_in, txt_in, pos_embed = modules
    if getattr(getattr(transformer, "config", None), "zero_cond_t", False):
        _dynamic_source(MODULATE_INDEX, add=True)
    transformer._qie_token_dims = [
        img_in.register_forward_hook(lambda _m, _a, out: _mark(out, 1)),
        txt_in.register_forward_hook(lambda _m, _a, out: _mark(out, 1)),
        pos_embed.register_forward_hook(lambda _m, _a, out: _mark_each(out, 0)),
        transformer.register_forward_pre_hook(_bool_mask, with_kwargs=True),
    ]
    return True


def unmark_token_dims(transformer: torch.nn.Module) -> None:
    """Remove `mark_token_dims`'s hooks."""
    zero_cond_t = getattr(getattr(transformer, "config", None), "zero_cond_t", False)
    if getattr(transformer, "_qie_token_dims", None) and zero_cond_t:
        _dynamic_source(MODULATE_INDEX, add=False)
    for hook in getattr(transformer, "_qie_token_dims", None) or []:
        hook.remove()
    transformer._qie_token_dims = None


# 2511 (`zero_cond_t`) builds a per-token index inside the transformer's forward, where no hook
# reaches it; Dynamo's `dynamic_sources` setting marks it by its name in the block's frame.
MODULATE_INDEX = "L['modulate_index']"


def _dynamic_source(source: str, add: bool) -> None:
    """Add `source` to (or remove it from) `torch.compiler.config.dynamic_sources`, where this torch has it."""
    config = torch.compiler.config
    if not hasattr(config, "dynamic_sources"):
        return
    sources = [s for s in config.dynamic_sources.split(",") if s and s != source]
    config.dynamic_sources = ",".join([*sources, source] if add else sources)


def _mark(tensor, dim: int) -> None:
    if isinstance(tensor, torch.Tensor) and tensor.dim() > dim:
        torch._dynamo.maybe_mark_dynamic(tensor, dim)


def _mark_each(tensors, dim: int) -> None:
    for tensor in tensors if isinstance(tensors, (tuple, list)) else [tensors]:
        _mark(tensor, dim)


def _bool_mask(_module, args, kwargs):
    """The prompt mask as bool (what the transformer converts it to), its token dimension marked."""
    mask = kwargs.get("encoder_hidden_states_mask")
    if not isinstance(mask, torch.Tensor):
        return None
    mask = mask if mask.dtype == torch.bool else mask.to(torch.bool)
    _mark(mask, 1)
    return args, {**kwargs, "encoder_hidden_states_mask": mask}


def inductor_options(module: torch.nn.Module) -> dict | None:
    """The Inductor options `module` was compiled with (`Module.compile`), as `torch.compile` resolved its mode.

    None when `module` is not compiled or the compiled wrapper does not show them (another torch).

    Example:
        >>> layer = torch.nn.Linear(2, 2); layer.compile(mode="reduce-overhead")
        >>> inductor_options(layer)
        {'triton.cudagraphs': True}
    """
    import inspect

    compiled = getattr(module, "_compiled_call_impl", None)
    if compiled is None:
        return None
    try:
        backend = inspect.getclosurevars(compiled).nonlocals.get("callback")
    except TypeError:
        return None
    for _ in range(8):  # dynamo wraps the backend a few times
        if backend is None or hasattr(backend, "compiler_name"):
            break
        backend = getattr(backend, "_torchdynamo_orig_backend", None)
    config = getattr(backend, "config", None)
    return dict(config) if isinstance(config, dict) else None


def compile_vae(vae: torch.nn.Module, mode: str = "on") -> bool:
    """Compile the VAE's decoder and encoder (`mode` "on"), in channels-last layout too ("channels-last");
    "off": nothing. ("auto" is decided by the caller: `Editor.load` compiles the VAE with the transformer.)

    The decoder runs once per edit over one latent frame, the encoder once per new input image (its
    convolutions as 2-D convolutions on CUDA, `qie.speed.vae_frames`); compiled, their norms and
    activations fuse around the convolutions, and channels-last (`torch.channels_last_3d`) can give
    cuDNN faster kernels. Compilation happens on the first decode and encode at each size. Returns
    True when compiled. Call it once per VAE, at load: a compiled module asserts the weight layout it
    was traced with, so changing the mode afterwards fails at the next call. `uncompile_vae` undoes it.

    On an H200 the compiled decoder takes a 1024² edit's decode from 0.048 to 0.019 s and its first
    decode compiles in 8-10 s from an empty cache (`bench-h200-an.json`, `bench-h200-ai.json`).
    Before `quantize_transformer` kept torchao's Inductor options to the blocks' compile, that first
    decode took 195 s (`bench-h200-ah.json`): coordinate-descent tuning was on for the whole process.
    The eager encoder's launches held the host for ~14 ms of a 768² edit's condition encode while
    the text encoder's inputs waited (`bench-h200-by.json`, `profile["gpu_idle"]`); compiled, the
    encoder adds 16.6-16.9 s to a first edit from an empty cache (`bench-h200-bz.json`,
    `bench-h200-ca.json`), inside the compile warm-up when `Editor.load` compiles.
    """
    if check_vae_mode(mode) == "off":
        return False
    set_cache_dir()
    for part in (vae.decoder, vae.encoder):
        if mode == "channels-last":  # conv weights only: the norms' 4-D gammas have no 3-D channels-last layout
            for module in part.modules():
                if isinstance(module, torch.nn.Conv3d):
                    module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
        part.compile()
    return True


def uncompile_vae(vae: torch.nn.Module) -> None:
    """Undo `compile_vae`'s compile (the layout stays): the decoder and encoder run eager again."""
    vae.decoder._compiled_call_impl = None
    vae.encoder._compiled_call_impl = None


def compile_streamed_blocks(blocks: torch.nn.ModuleList, backend: str = "inductor", mode: str | None = None) -> None:
    """Compile each block's `forward` (one graph for all: same code, weights are graph inputs).

    Unlike `compile_repeated_blocks`, which compiles the whole module call, only `forward` is
    compiled, so the streamer's pre/post hooks (copies, events, weight binding) stay eager and
    the compiled code reads whatever buffers the hooks bound for this call.
    """
    for block in blocks:
        if "forward" not in vars(block):
            block.forward = torch.compile(block.forward, fullgraph=True, backend=backend, mode=mode)


def uncompile_blocks(transformer: torch.nn.Module) -> None:
    """Undo `compile_blocks` (e.g. after a failed warm-up): blocks run eager again, diffusers' prologue too."""
    unmark_token_dims(transformer)
    block_prologue.uninstall(transformer)
    qk_prologue.uninstall(transformer)
    rope.uninstall(transformer)
    for module in transformer.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
        if isinstance(vars(module).get("forward"), Callable):
            del module.forward  # compile_streamed_blocks' per-instance forward: back to the class's
    hook = getattr(transformer, "_qie_graph_step", None)
    if hook is not None:
        hook.remove()
        transformer._qie_graph_step = None
    try:
        torch._dynamo.reset()
    except RuntimeError:  # torch 2.13: resetting a CUDA-graph backend edits the cache it iterates; once more is clean
        torch._dynamo.reset()
