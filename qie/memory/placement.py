"""Where the text encoder and the VAE run: streamed or resident, fp8 storage, VAE tile size.

The memory plans (`qie.memory.plans`) decide; this module carries a decision out on a pipeline:

- `stream_text_encoder`: the text encoder's layers stay in pinned host memory and cross PCIe for
  each call, optionally stored in fp8 (half the bytes; 0.30 s against 0.44 s per 1024² edit on an
  H200, `benchmarks/bench-h200-placement.json`). The token embedding never crosses: ids are looked
  up on the host (`lookup_on_host`) and only the rows cross.
- `set_vae_tiling`: the VAE untiled, or diffusers' tiling with square tiles of a given side. Tiles
  of 256 px (diffusers' default) cost 0.57 s of condition encode and 0.76 s of decode per 1024²
  edit on an H200; 576 px tiles 0.08 + 0.11 s; untiled 0.06 + 0.08 s and ~2.4 GiB more memory.

Example:
    >>> set_vae_tiling(pipe.vae, 576)  # doctest: +SKIP
"""

from __future__ import annotations

import logging

import torch

from qie.memory.pinned import PinnedArena

log = logging.getLogger(__name__)

# VAE tile sides tried, largest first. Neighbouring tiles share VAE_TILE_BLEND pixels (diffusers
# blends linearly over side - stride), so a 1024² image is 2 x 2 tiles of 576 px.
VAE_TILES = (576, 512, 256)
VAE_TILE_BLEND = 64


def set_vae_tiling(vae, tile: int | None) -> None:
    """Run `vae` untiled (`tile` None) or in square tiles of `tile` pixels (stride `tile - VAE_TILE_BLEND`).

    Example:
        >>> set_vae_tiling(pipe.vae, None)  # doctest: +SKIP
    """
    if tile is None:
        vae.disable_tiling()
        return
    stride = tile - VAE_TILE_BLEND
    vae.enable_tiling(
        tile_sample_min_height=tile,
        tile_sample_min_width=tile,
        tile_sample_stride_height=stride,
        tile_sample_stride_width=stride,
    )


def stores_fp8(module: torch.nn.Module) -> bool:
    """Whether any weight of `module` is stored in fp8 (e.g. by `store_text_encoder_fp8`)."""
    return any(p.dtype == torch.float8_e4m3fn for p in module.parameters())


def _store_fp8(text_encoder: torch.nn.Module) -> None:
    """Store the text encoder's weights in fp8 (`store_text_encoder_fp8`) unless they already are."""
    if stores_fp8(text_encoder):
        return
    from qie.memory.quantize import store_text_encoder_fp8

    store_text_encoder_fp8(text_encoder, next(p.dtype for p in text_encoder.parameters() if p.is_floating_point()))


def stream_text_encoder(pipe, device: torch.device, fp8: bool = False) -> None:
    """Stream `pipe.text_encoder` to `device` layer by layer for each call; with `fp8`, store it in fp8 first.

    diffusers' group offloading does this job: the vision tower's blocks and the language model's
    layers streamed from pinned memory on a side stream, one ahead of the compute. The encoder
    runs once or twice per edit, so streaming all of it costs little. It is applied to the two
    layer stacks separately (recursing from the top registers its prefetch tracker twice). The
    token embedding is looked up outside the language model's forward, where no group hook
    fires: it stays on the host and looks ids up there (`lookup_on_host`), so only the prompt's
    rows cross, not the 1 GiB table. The LM head (1 GiB for the 7B encoder) comes to the GPU for
    each of its calls and leaves after it (`onload_per_call`): edits never call it
    (`qie.core.stages.hidden_state_model`), the prompt rewriter's `generate` does.
    """
    from diffusers.hooks import apply_group_offloading

    te = pipe.text_encoder
    if getattr(te, "qie_streamed_to", None) == device:  # already streaming there (an OOM step-down re-applies plans)
        return
    if fp8:
        _store_fp8(te)
    on_cuda = device.type == "cuda"
    if on_cuda:  # weights copied straight into 1 GiB pinned blocks (`qie.memory.pinned`: no rounding up)
        te.qie_pinned = PinnedArena()
        te.qie_pinned.pin_parameters(te)
    te.to("cpu")
    lm = te.model.language_model
    embed = lm.embed_tokens
    lm.embed_tokens = torch.nn.Identity()  # keep it out of the language model's offload group
    for part in (te.model.visual, lm):
        apply_group_offloading(
            part,
            onload_device=device,
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=on_cuda,
            record_stream=on_cuda,
        )
    lm.embed_tokens = embed
    te.qie_streamed_to = device
    if te.lm_head.weight is embed.weight:  # tied: one tensor, keep it on the GPU
        embed.to(device)
        return
    lookup_on_host(embed, device)
    onload_per_call(te.lm_head, device)


def lookup_on_host(embed: torch.nn.Embedding, device: torch.device) -> None:
    """Look `embed`'s ids up where its table lives (the host, for a streamed encoder) and copy only
    the looked-up rows to `device`: a few hundred rows per prompt instead of the whole table.

    Replaces `embed.forward` with `torch.nn.functional.embedding` on the module's own weight and
    settings (`padding_idx`, `max_norm`, ...), so the rows are those `nn.Embedding` would return.
    On CUDA the rows are staged in pinned memory and copied without blocking. A table that was
    later moved to a device (e.g. by the model-offload plan) is looked up there.

    Example:
        >>> emb = torch.nn.Embedding(10, 4, padding_idx=0)
        >>> lookup_on_host(emb, torch.device("cpu"))
        >>> emb(torch.tensor([[0, 3]])).shape
        torch.Size([1, 2, 4])
    """
    pin = device.type == "cuda"
    embed.to("cpu")

    def forward(ids: torch.Tensor) -> torch.Tensor:
        weight = embed.weight
        rows = torch.nn.functional.embedding(
            ids.to(weight.device),
            weight,
            embed.padding_idx,
            embed.max_norm,
            embed.norm_type,
            embed.scale_grad_by_freq,
            embed.sparse,
        )
        if pin and rows.device.type == "cpu":
            rows = rows.pin_memory()
        return rows.to(device, non_blocking=pin)

    embed.forward = forward


def place_text_encoder(pipe, device: torch.device, where: str) -> None:
    """Carry out a text-encoder placement: "resident", "resident-fp8", "stream-fp8" or "stream"."""
    te = pipe.text_encoder
    if where.startswith("stream"):
        stream_text_encoder(pipe, device, fp8=where == "stream-fp8")
        return
    if where == "resident-fp8":
        _store_fp8(te)
    te.to(device)


def onload_per_call(module: torch.nn.Module, device: torch.device) -> None:
    """Keep `module`'s weights in (pinned) host memory and copy them to `device` only for its calls.

    For large modules called rarely (the streamed text encoder's LM head, called by the prompt
    rewriter's `generate`): the copy costs tens of milliseconds, the memory is free the rest of the time.
    """
    pin = device.type == "cuda"
    params = list(module.parameters())
    host = [p.data.to("cpu").pin_memory() if pin else p.data.to("cpu") for p in params]
    for p, h in zip(params, host, strict=True):
        p.data = h

    def onload(mod, args):
        for p, h in zip(params, host, strict=True):
            p.data = h.to(device, non_blocking=pin)

    def offload(mod, args, output):
        for p, h in zip(params, host, strict=True):
            p.data = h

    module.register_forward_pre_hook(onload)
    module.register_forward_hook(offload)
