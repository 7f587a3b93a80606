"""Fault injection: make a pipeline component fail on a chosen call, to drill the recovery paths.

A forward pre-hook on the component raises the error, so the failure happens inside the real
stage (e.g. in the middle of the denoising loop), with the real tensors alive, exactly where a
real out-of-memory error would come from. Nothing here runs unless a test or an operator asks.

Example:
    >>> from qie import faults
    >>> with faults.inject(editor.pipe.transformer, after=2):  # doctest: +SKIP
    ...     editor.edit(request)          # the 3rd transformer call raises torch.OutOfMemoryError

From the environment (for a server started in another process): `QIE_FAULT=transformer:oom:2`
arms the same fault on the named component of the next editor an adapter loads (`qie.settings`
reads it into `LoadOptions.fault`; `Editor.load` calls `arm_spec`).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

ERRORS: dict[str, Callable[[], BaseException]] = {
    "oom": lambda: torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB (injected by qie.core.faults)"
    ),
    "runtime": lambda: RuntimeError("injected failure (qie.core.faults)"),
}


@dataclass
class Fault:
    """An armed fault: how often its component was called and how often it raised."""

    component: str
    after: int
    times: int
    error: Callable[[], BaseException]
    calls: int = 0
    raised: int = 0
    inputs: dict[str, weakref.ref] = field(default_factory=dict)  # the tensors the failing call held, by name
    _handle: Any = None

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls += 1
        if self.calls > self.after and self.raised < self.times:
            self.raised += 1
            named = {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}
            self.inputs = {k: weakref.ref(v) for k, v in named.items() if isinstance(v, torch.Tensor)}
            log.warning("fault injected into %s (call %d)", self.component, self.calls)
            raise self.error()

    def remove(self) -> None:
        """Disarm the fault."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def arm(module: torch.nn.Module, *, after: int = 0, times: int = 1, error: str = "oom", name: str = "") -> Fault:
    """Make `module`'s forward raise `error` ("oom" or "runtime") on calls after the first `after`, `times` times."""
    if error not in ERRORS:
        raise ValueError(f"error={error!r}: use one of {sorted(ERRORS)}")
    fault = Fault(component=name or type(module).__name__, after=after, times=times, error=ERRORS[error])
    fault._handle = module.register_forward_pre_hook(fault._hook, with_kwargs=True)
    return fault


@contextmanager
def inject(
    module: torch.nn.Module, *, after: int = 0, times: int = 1, error: str = "oom", name: str = ""
) -> Iterator[Fault]:
    """`arm` for the duration of a `with` block."""
    fault = arm(module, after=after, times=times, error=error, name=name)
    try:
        yield fault
    finally:
        fault.remove()


def arm_spec(pipe: Any, spec: str) -> Fault:
    """Arm the fault described by `spec` ("component:error[:after[:times]]") on a component of `pipe`."""
    parts = spec.split(":")
    component, error = parts[0], parts[1] if len(parts) > 1 else "oom"
    after = int(parts[2]) if len(parts) > 2 else 0
    times = int(parts[3]) if len(parts) > 3 else 1
    module = getattr(pipe, component, None)
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"fault={spec!r}: {component!r} is not a component of the pipeline; e.g. transformer")
    log.warning("fault drill armed: %s will raise %s after %d calls (%d times)", component, error, after, times)
    return arm(module, after=after, times=times, error=error, name=component)
