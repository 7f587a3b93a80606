"""Rotary position embedding in real arithmetic, so that compiled blocks fuse it with the q/k norms.

diffusers applies Qwen-Image's RoPE as a complex multiplication (`view_as_complex(q) * freqs`).
Inductor has no code generation for complex numbers: inside a compiled block the multiplication
falls back to an eager ATen kernel, between a fused norm kernel that writes float32 pairs and a
second kernel that casts them back (measured on an H200 at 1024²: about 16 ms of a 0.21 s forward
in those three kernels, 60 blocks). The same rotation in real numbers,
``(a + ib)(c + id) = (ac - bd) + i(ad + bc)``, is ordinary elementwise work that Inductor fuses
into the RMSNorm kernel before it.

`install(transformer)` makes the transformer's rotary module return its frequencies as real
``(..., 2)`` pairs (`torch.view_as_real`, a view: no copy) and gives the diffusers module an
`apply_rotary_emb_qwen` that rotates in real arithmetic when handed such pairs and runs diffusers'
own complex code otherwise, so other transformers in the process are untouched. It pays only
under `torch.compile` (in eager it launches more kernels than the complex form), so
`qie.speed.compile.compile_blocks` installs it and `uncompile_blocks` removes it. Tolerance
``rope-real``: the same float32 products, summed in another order where the compiler fuses them.

Example:
    >>> install(pipe.transformer)            # doctest: +SKIP
    True
"""

from __future__ import annotations

import importlib
import logging

import torch

from qie.speed.fa3 import QWEN_MODULE

log = logging.getLogger(__name__)


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [B, S, H, D] by `freqs` [S, D/2, 2] (cos, sin pairs) in float32; result in `x`'s dtype.

    Equal to diffusers' ``apply_rotary_emb_qwen(x, torch.view_as_complex(freqs), use_real=False)``:
    consecutive channel pairs of `x` are complex numbers multiplied by ``cos + i sin``.

    Example:
        >>> x = torch.ones(1, 1, 1, 2); freqs = torch.tensor([[[0.0, 1.0]]])  # a quarter turn
        >>> rotate(x, freqs).tolist()
        [[[[-1.0, 1.0]]]]
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = freqs[..., 0].unsqueeze(1), freqs[..., 1].unsqueeze(1)  # broadcast over heads
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def _apply(original):
    """diffusers' `apply_rotary_emb_qwen` signature: real pairs rotate here, anything else goes to `original`."""

    def apply_rotary_emb_qwen(x, freqs_cis, use_real=True, use_real_unbind_dim=-1):
        if use_real or not isinstance(freqs_cis, torch.Tensor) or freqs_cis.is_complex():
            return original(x, freqs_cis, use_real=use_real, use_real_unbind_dim=use_real_unbind_dim)
        return rotate(x, freqs_cis)

    apply_rotary_emb_qwen.qie_original = original
    return apply_rotary_emb_qwen


def _as_real(freqs):
    """Complex tensors (alone or in a tuple/list) as real ``(..., 2)`` views; anything else unchanged."""
    if isinstance(freqs, torch.Tensor):
        return torch.view_as_real(freqs) if freqs.is_complex() else freqs
    if isinstance(freqs, tuple | list):
        return type(freqs)(_as_real(f) for f in freqs)
    return freqs


def install(transformer: torch.nn.Module) -> bool:
    """Rotate `transformer`'s queries and keys in real arithmetic; False (logged) when it has no Qwen RoPE.

    Idempotent. The transformer's `pos_embed` gets a forward hook that returns its frequencies as
    real pairs; diffusers' module-level `apply_rotary_emb_qwen` becomes the dispatcher above.
    """
    pos_embed = getattr(transformer, "pos_embed", None)
    module = importlib.import_module(QWEN_MODULE)
    if pos_embed is None or not hasattr(module, "apply_rotary_emb_qwen"):
        log.info("real-arithmetic RoPE not installed: %s has no Qwen RoPE", type(transformer).__name__)
        return False
    if not hasattr(module.apply_rotary_emb_qwen, "qie_original"):
        module.apply_rotary_emb_qwen = _apply(module.apply_rotary_emb_qwen)
    if getattr(pos_embed, "_qie_real_rope", None) is None:
        pos_embed._qie_real_rope = pos_embed.register_forward_hook(lambda _m, _a, out: _as_real(out))
    return True


def installed(transformer: torch.nn.Module) -> bool:
    """Whether `install` applies to `transformer` now."""
    return getattr(getattr(transformer, "pos_embed", None), "_qie_real_rope", None) is not None


def uninstall(transformer: torch.nn.Module) -> None:
    """Give `transformer`'s rotary module its complex output back (the module-level dispatcher stays: it
    passes complex frequencies to diffusers' code unchanged)."""
    pos_embed = getattr(transformer, "pos_embed", None)
    hook = getattr(pos_embed, "_qie_real_rope", None)
    if hook is not None:
        hook.remove()
        pos_embed._qie_real_rope = None
