"""Attention: which kernel the transformer uses, chosen once at load, and quantized attention per request.

`choose_backend` picks the fastest backend the machine has, from facts a probe reads (installed
packages, GPU generation, dtype), and says why it passed over each faster one. `apply_backend`
sets it on the transformer through diffusers' `set_attention_backend`.
`quantized_attention` switches one request to SageAttention (int8 Q·K, fp16 or fp8 P·V) and
back, or falls back to the default backend with a warning when it cannot.

Example:
    >>> facts = AttentionFacts(device="cuda", capability=(9, 0), dtype="bf16", cudnn=True,
    ...                        flash_attn_3=False, flash_attn=False, sageattention=False)
    >>> choose_backend(facts).name
    'native'
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from qie.errors import InvalidRequestError
from qie.speed import fa3
from qie.speed.options import ATTENTION_QUANT_MODES

log = logging.getLogger(__name__)

NATIVE = "native"
CPU_BACKENDS = (NATIVE, "_native_math")  # PyTorch's own kernels that run without a GPU


@dataclass(frozen=True)
class AttentionFacts:
    """What the backend choice depends on; read by `probe_facts`, or made up in tests."""

    device: str  # "cuda", "cpu", ...
    capability: tuple[int, int] | None  # CUDA compute capability, None off CUDA
    dtype: str  # "bf16", "fp16", "fp32"
    cudnn: bool
    flash_attn_3: bool  # diffusers can import flash-attn 3 (`flash_attn_interface`)
    flash_attn: bool  # diffusers can import flash-attn 2 (>= 2.6.3)
    sageattention: bool  # diffusers can import sageattention (>= 2.1.1)


@dataclass(frozen=True)
class BackendChoice:
    """The chosen diffusers attention backend and, for each faster one passed over, why."""

    name: str
    fallbacks: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        return " → ".join([*self.fallbacks, self.name])


def probe_facts(device: torch.device, dtype: torch.dtype) -> AttentionFacts:
    """Read the attention facts of this machine (diffusers' own import checks decide the packages)."""
    from diffusers.models import attention_dispatch as dispatch

    cuda = device.type == "cuda" and torch.cuda.is_available()
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    return AttentionFacts(
        device=device.type,
        capability=torch.cuda.get_device_capability(device) if cuda else None,
        dtype=names.get(dtype, str(dtype)),
        cudnn=cuda and torch.backends.cudnn.is_available(),
        flash_attn_3=bool(dispatch._CAN_USE_FLASH_ATTN_3),
        flash_attn=bool(dispatch._CAN_USE_FLASH_ATTN),
        sageattention=bool(dispatch._CAN_USE_SAGE_ATTN),
    )


def _reasons(facts: AttentionFacts) -> dict[str, str | None]:
    """For each GPU backend qie knows: why it cannot run here, or None."""
    cap = facts.capability or (0, 0)
    half = facts.dtype in ("bf16", "fp16")
    return {
        "_flash_3": _reason(facts.flash_attn_3, "flash-attn 3", cap[0] == 9 and half, "a Hopper GPU"),
        "flash": _reason(facts.flash_attn, "flash-attn", cap >= (8, 0) and half, "an Ampere or newer GPU"),
        "_native_cudnn": _reason(facts.cudnn, "cuDNN", cap >= (8, 0) and half, "an Ampere or newer GPU"),
    }


def _candidates(facts: AttentionFacts) -> list[tuple[str, str | None]]:
    """(backend, reason it cannot run here or None), fastest first for this GPU generation."""
    cap = facts.capability or (0, 0)
    reasons = _reasons(facts)
    flash3, flash2 = ("_flash_3", reasons["_flash_3"]), ("flash", reasons["flash"])
    # PyTorch's own SDPA ("native") already dispatches to its cuDNN / flash kernels. Forcing cuDNN
    # ("_native_cudnn") was slower end to end on an H100 (0.402 vs 0.391 s a step at 1024²,
    # benchmarks/bench-h100-a.json), so it is left to explicit overrides.
    order = [flash3] if cap >= (9, 0) else [flash2]
    return [*order, (NATIVE, None)]


def _reason(installed: bool, package: str, usable: bool, gpu: str) -> str | None:
    if not installed:
        return f"{package} not installed"
    return None if usable else f"{package} attention needs {gpu} and bf16/fp16"


def choose_backend(
    facts: AttentionFacts, override: str | None = None, *, known: Callable[[], set[str]] | None = None
) -> BackendChoice:
    """The fastest backend these `facts` allow, or `override` ("auto"/None: choose) when it can run.

    Off CUDA the choice is "native" (PyTorch SDPA), or an override among `CPU_BACKENDS`. An `override`
    diffusers does not know raises `InvalidRequestError`; one that cannot run here falls back to
    the automatic choice, with the reason.
    """
    passed: list[str] = []
    if override not in (None, "auto"):
        names = (known or known_backends)()
        if override not in names:
            raise InvalidRequestError("attention", override, f"use 'auto' or one of {sorted(names)}")
        if facts.device != "cuda":
            if override in CPU_BACKENDS:
                return BackendChoice(override)
            passed.append(f"{override}: needs a CUDA GPU")
    if facts.device != "cuda":
        return BackendChoice(NATIVE, tuple(passed))
    candidates = _candidates(facts)
    if override not in (None, "auto"):
        reason = _reasons(facts).get(override)
        if reason is None and _runnable(override, facts):
            return BackendChoice(override)
        passed.append(f"{override}: {reason or 'not available here'}")
    for name, reason in candidates:
        if reason is None:
            return BackendChoice(name, tuple(passed))
        passed.append(reason)
    return BackendChoice(NATIVE, tuple(passed))  # not reached: native has no reason


def _runnable(name: str, facts: AttentionFacts) -> bool:
    """Whether a backend outside the automatic list (an override) can run with these facts."""
    if name.startswith("_sage") or name.startswith("sage"):
        return facts.sageattention and facts.capability is not None and facts.capability >= (8, 0)
    if name in ("flash", "flash_varlen"):
        return facts.flash_attn
    if name in ("_flash_3", "_flash_varlen_3"):
        return facts.flash_attn_3
    # PyTorch's own backends (native, _native_flash, _native_efficient, _native_math, flex) run anywhere
    # torch does; the hub-kernel ones need a download, which qie does not do.
    return not name.endswith("_hub") and name not in ("xformers", "_native_npu", "_native_xla")


def known_backends() -> set[str]:
    """Every backend name diffusers knows."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return {b.value for b in AttentionBackendName}


def apply_backend(transformer: torch.nn.Module, choice: BackendChoice) -> None:
    """Set `choice` on the transformer, logging the choice and every fallback (WARNING)."""
    for reason in choice.fallbacks:
        log.warning("attention backend: %s; trying the next one", reason)
    transformer.set_attention_backend(choice.name)
    log.info("attention backend: %s", choice.describe())


def quantized_backend(facts: AttentionFacts, mode: str) -> tuple[str | None, str]:
    """The SageAttention backend for `mode` ("int8"/"fp8") on this machine, or None and the reason.

    "int8": Q·K in int8, P·V in fp16 (Ampere and newer). "fp8": Q·K in int8, P·V in fp8 (Ada
    and Hopper; the sm90 kernel on Hopper).
    """
    if mode not in ATTENTION_QUANT_MODES or mode == "off":
        raise InvalidRequestError("attention_quant", mode, f"use one of {ATTENTION_QUANT_MODES}")
    if facts.device != "cuda" or facts.capability is None:
        return None, "quantized attention needs a CUDA GPU"
    if not facts.sageattention:
        # PyPI's sageattention is 1.0.6; diffusers needs SageAttention 2 (built from source).
        return None, "sageattention >= 2.1.1 is not installed"
    if facts.dtype not in ("bf16", "fp16"):
        return None, "quantized attention needs bf16 or fp16 activations"
    cap = facts.capability
    if mode == "int8":
        if cap < (8, 0):
            return None, "int8 attention needs an Ampere or newer GPU"
        return "_sage_qk_int8_pv_fp16_cuda", ""
    if cap[0] == 9:
        return "_sage_qk_int8_pv_fp8_cuda_sm90", ""
    if cap >= (8, 9):
        return "_sage_qk_int8_pv_fp8_cuda", ""
    return None, "fp8 attention needs an Ada or Hopper GPU"


@contextlib.contextmanager
def quantized_attention(
    transformer: torch.nn.Module, mode: str, default: str, facts: AttentionFacts
) -> Iterator[str | None]:
    """Run the body with quantized attention for `mode`, then restore `default`.

    "fp8" under FA3 (`default` "fa3-fwd") runs FA3's fp8 forward; otherwise SageAttention.

    Yields a note for the result: what ran, or why the request fell back to `default` (also
    logged at WARNING). With mode "off" nothing changes and the note is None.
    """
    if mode == "off":
        yield None
        return
    if mode == "fp8" and default == fa3.NAME and fa3.installed():
        with fa3.fp8_attention():
            yield "attention_quant=fp8: FlashAttention-3 fp8 forward (per-head scales)"
        return
    backend, reason = quantized_backend(facts, mode)
    if backend is None:
        log.warning("attention_quant=%s unavailable (%s); using %s attention", mode, reason, default)
        yield f"attention_quant={mode} unavailable ({reason}): ran {default} attention"
        return
    transformer.set_attention_backend(backend)
    try:
        yield f"attention_quant={mode}: SageAttention backend {backend}"
    finally:  # under FA3 the transformer's own backend is diffusers' native one
        transformer.set_attention_backend(NATIVE if default == fa3.NAME else default)
