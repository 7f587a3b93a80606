"""Give modules a different forward by mixing a class into theirs, and take it out again.

`vision_attention`, `vae_frames` and `block_prologue` change how some of a model's modules run without
replacing the modules (their weights, hooks and names stay): each eligible module's class becomes a
subclass of a mixin and of its own class; taking the mixin out restores the original class.

A class swap only acts where calls reach the class's forward. diffusers' hook registry, once its hooks
are removed (e.g. after a step-cache edit), leaves an instance-level `forward` on each module: the
class's forward of that moment, bound. Both directions drop such a stale attribute first
(`calls_class_forward`); a module with any other instance-level forward (a live hook, a per-instance
compile) is not mixed into.

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
        if eligible(module) and calls_class_forward(module):
            module.__class__ = mixed(type(module))
            changed += 1
    if changed:
        log.info(message, changed)
    return changed


def mix_out(root: torch.nn.Module, mixin: type) -> None:
    """Give every module of `root` whose class mixes in `mixin` its original class back."""
    for module in root.modules():
        if isinstance(module, mixin):
            calls_class_forward(module)  # a stale bound forward would keep running the mixin's
            module.__class__ = type(module).__mro__[2]  # (mixed, mixin, original, ...)


def calls_class_forward(module: torch.nn.Module) -> bool:
    """Whether calling `module` runs its class's forward. An instance-level `forward` that is only the class's
    own forward bound to the module (what diffusers' hook registry leaves when its hooks are removed) is
    dropped first; any other (a live hook, a per-instance compile) is kept, and the answer is False."""
    own = vars(module).get("forward")
    if own is None:
        return True
    if getattr(own, "__self__", None) is module and getattr(own, "__func__", None) is type(module).forward:
        del module.forward
        return True
    return False
