"""The text encoder's vision tower: each block's windowed attention as one masked SDPA call, no host syncs.

Qwen2.5-VL's vision tower attends within 112-px windows in most blocks and over each whole image
in a few (`fullatt_block_indexes`). Without flash-attn, transformers runs every window as its own
SDPA call after reading the window lengths to the host (`lengths.tolist()`): on an H200 the tower
took ~50 ms of a ~90 ms prompt encode for ~5 ms of GPU work (`benchmarks/fast-levers-h200-i.json`).
`install` gives each vision attention module a forward that runs one SDPA call over all patches
with a block-diagonal mask built on the GPU from `cu_seqlens` (a patch attends to the patches of
its own window or image, as before), so the tower launches a fixed number of kernels and never
waits for the GPU. Same arithmetic up to float rounding (tolerance "vision-attention-masked").

Applied at load on CUDA (`qie.core.speed_setup.setup_speed`); with a flash-attn implementation
(varlen kernels, no host loop) nothing changes.

Example:
    >>> install(pipe.text_encoder)  # doctest: +SKIP
    32
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch
from torch import nn

from qie.speed.mixins import mix_in, mix_out


def window_mask(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """(1, 1, length, length) boolean mask: True where two patches lie in the same window of `cu_seqlens`.

    `cu_seqlens` holds the cumulative window lengths, starting at 0 (as the vision tower builds them).

    Example:
        >>> window_mask(torch.tensor([0, 2, 3]), 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    """
    positions = torch.arange(length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    window = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)
    return (window[:, None] == window[None, :])[None, None]


class MaskedVisionAttention(nn.Module):
    """A Qwen2.5-VL vision attention module whose windows run as one masked SDPA call (see the module doc)."""

    qkv: nn.Linear
    proj: nn.Linear
    num_heads: int
    scaling: float
    rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # the modeling module's own, set by `_masked_class`

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        rotary_pos_emb: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        length = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        if position_embeddings is None:  # transformers versions that pass the raw rotary angles
            angles = torch.cat((rotary_pos_emb, rotary_pos_emb), dim=-1)
            position_embeddings = (angles.cos(), angles.sin())
        q, k = self.rotary(q, k, *position_embeddings)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        mask = _cached_mask(cu_seqlens, length)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        return self.proj(out.squeeze(0).transpose(0, 1).reshape(length, -1))


_MASKS: list[tuple[torch.Tensor, torch.Tensor]] = []  # (cu_seqlens, mask): the current forward's two


def _cached_mask(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """The mask of `cu_seqlens`, built once per tensor: a tower's forward passes the same two to every block."""
    for known, mask in _MASKS:
        if known is cu_seqlens and mask.shape[-1] == length:
            return mask
    mask = window_mask(cu_seqlens, length)
    _MASKS[:] = [*_MASKS[-1:], (cu_seqlens, mask)]
    return mask


def forget_masks() -> None:
    """Empty the cache of masks (`qie.speed.vision_graphs` records each graph's own)."""
    _MASKS.clear()


@functools.cache
def _masked_class(base: type) -> type:
    rotary = importlib.import_module(base.__module__).apply_rotary_pos_emb_vision
    return type(f"Masked{base.__name__}", (MaskedVisionAttention, base), {"rotary": staticmethod(rotary)})


def _eligible(module: nn.Module) -> bool:
    if not type(module).__name__.endswith("VisionAttention") or isinstance(module, MaskedVisionAttention):
        return False
    if not all(hasattr(module, name) for name in ("qkv", "proj", "num_heads", "scaling", "config")):
        return False
    if "flash" in str(getattr(module.config, "_attn_implementation", "") or ""):
        return False  # varlen flash kernels: no host loop to remove
    return hasattr(importlib.import_module(type(module).__module__), "apply_rotary_pos_emb_vision")


def install(text_encoder: nn.Module) -> int:
    """Give every vision attention module of `text_encoder` the one-call masked forward; how many changed."""
    message = "vision tower: windowed attention as one masked SDPA call in %d blocks"
    return mix_in(text_encoder, _eligible, _masked_class, message)


def uninstall(text_encoder: nn.Module) -> None:
    """Give the vision attention modules their own forward back."""
    mix_out(text_encoder, MaskedVisionAttention)
