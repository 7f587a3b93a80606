"""Give modules a different forward by mixing a class into theirs, and take it out again.

`vision_attention` and `vae_frames` change how some of a model's modules run without replacing
the modules (their weights, hooks and names stay): each eligible module's class becomes a subclass
of a mixin and of its own class; taking the mixin out restores the original class.

Example:
    >>> class Loud(torch.nn.Module):
    ...     def forward(self, x):
    ...         return super().forward(x) * 10
    >>> model = torch.nn.Sequential(torch.nn.Identity())
    >>> mix_in(model, lambda m: type(m) is torch.nn.Identity, lambda base: type("LoudIdentity", (Loud, base), {}))
    1
    >>> model(torch.ones(1)).item(), mix_out(model, Loud), model(torch.ones(1)).item()
    (10.0, None, 1.0)
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def mix_in(
    root: torch.nn.Module,
    eligible: Callable[[torch.nn.Module], bool],
    mixed: Callable[[type], type],
    message: str = "%d modules changed",
) -> int:
    """Give each module of `root` that is `eligible` the class `mixed(its class)`; how many changed,
    logged (when any) at INFO as `message % count`.

    `mixed(base)` must return a class whose bases are (the mixin, `base`), as `mix_out` expects.
    """
    changed = 0
    for module in root.modules():
        if eligible(module):
            module.__class__ = mixed(type(module))
            changed += 1
    if changed:
        log.info(message, changed)
    return changed


def mix_out(root: torch.nn.Module, mixin: type) -> None:
    """Give every module of `root` whose class mixes in `mixin` its original class back."""
    for module in root.modules():
        if isinstance(module, mixin):
            module.__class__ = type(module).__mro__[2]  # (mixed, mixin, original, ...)
