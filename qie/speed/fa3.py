"""FlashAttention-3 forward (the `fa3-fwd` wheel) for the transformer's joint attention, masks included.

On Hopper GPUs (compute capability 9.x) FA3's forward beats PyTorch's SDPA kernels at the model's
shape (8422 tokens, 24 heads x 128: 1.14 ms against 1.35 ms for cuDNN SDPA on an H200). It has no
attention-mask input, and SDPA with a mask falls back to a slower kernel: batched CFG and request
batching pad the shorter prompt and mask its padding. FA3 takes instead the number of keys each
sample uses (`seqused_k`): the keys are reordered so that every sample's kept keys come first
(attention does not depend on the order of the keys), which keeps shapes static, so the call
compiles into the block graph and needs no host synchronization.

`install()` routes the Qwen-Image transformer's attention through `joint_attention`; calls FA3
cannot serve (no CUDA tensors, another dtype, dropout, a context-parallel config) go to diffusers'
own dispatcher. `fa3-fwd` is an optional dependency: without it, or off Hopper, nothing changes.

Inside `fp8_attention()` (a request's `attention_quant="fp8"`) the same call runs FA3's fp8
forward: Q, K and V are cast to fp8 (e4m3) with one scale per sample and head (each head's
largest magnitude maps to 448), which FA3 takes as descale factors; the output stays bf16.
Tolerance: `qie.core.tolerances` ("attention-fa3-fp8"). Compiled blocks trace the fp8 variant
as a second graph on its first use. With the fused q/k prologue (`qie.speed.qk_prologue`) the
queries and keys arrive in fp8 already, under a scale bounded by the norms' weights
(`prequantized_attention`); only the values are scaled by their measured maximum
(`qie.speed.fp8_values`).

Example:
    >>> install(torch.device("cpu"))  # no Hopper GPU here: nothing is installed
    False
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable, Iterator

import torch

log = logging.getLogger(__name__)

NAME = "fa3-fwd"  # the attention backend name an editor reports when FA3 serves its attention
QWEN_MODULE = "diffusers.models.transformers.transformer_qwenimage"
REPLACES = ("None", "native", "_native_cudnn")  # backends FA3 stands in for; others (SageAttention) stay
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
# (q8, k8, v8, seqused_k, q_scale, k_scale, v_scale) -> bf16: fp8 inputs with one scale per sample and head
Fp8Forward = Callable[..., torch.Tensor]


def fa3_kernel() -> Kernel | None:
    """FA3's forward as `kernel(q, k, v, seqused_k)` (B x S x H x D tensors), or None if not installed."""
    try:
        import fa3_fwd_interface  # noqa: F401  (registers torch.ops.fa3_fwd)
    except ImportError:
        return None

    def kernel(q, k, v, used):
        return torch.ops.fa3_fwd._flash_attn_forward(q, k, v, seqused_k=used)[0]

    kernel.hopper_only = True
    return kernel


def fa3_fp8_forward() -> Fp8Forward | None:
    """FA3's fp8 forward on inputs already in fp8 (B x S x H x D) with their [B, H] scales; bf16 out."""
    if fa3_kernel() is None:
        return None

    def forward(q8, k8, v8, used, q_scale, k_scale, v_scale):
        out = torch.ops.fa3_fwd._flash_attn_forward(
            q8, k8, v8, seqused_k=used, q_descale=q_scale, k_descale=k_scale, v_descale=v_scale
        )
        return out[0].to(torch.bfloat16)

    forward.hopper_only = True
    return forward


def quantizing(forward: Fp8Forward) -> Kernel:
    """A bf16 `Kernel` that casts Q, K and V to fp8 (`quantize_heads`) and runs `forward` on them."""

    def kernel(q, k, v, used):
        (q8, qs), (k8, ks), (v8, vs) = quantize_heads(q), quantize_heads(k), quantize_heads(v)
        return forward(q8, k8, v8, used, qs, ks, vs).to(q.dtype)

    kernel.hopper_only = getattr(forward, "hopper_only", False)
    return kernel


def fa3_fp8_kernel() -> Kernel | None:
    """FA3's fp8 forward as `kernel(q, k, v, seqused_k)`: bf16 in, per-head fp8 scaling, bf16 out."""
    forward = fa3_fp8_forward()
    return None if forward is None else quantizing(forward)


def quantize_heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` (B x S x H x D) as fp8 values and one fp32 scale per sample and head (B x H): x ≈ values * scale."""
    from qie.memory.fp8_matmul import fp8_scale, to_fp8

    # Per token and head first (a row reduction Inductor can fuse into the kernel that makes `x`), then
    # over the tokens of the small (B x S x H) result. One reduction over dims (1, 3) compiled into
    # slow column reductions: 0.32 ms per two blocks on an H200, more than FA3's fp8 forward saved
    # (benchmarks/fast-levers-h200-m.json); this two-stage form is not yet measured on a GPU.
    scale = fp8_scale(x.abs().amax(dim=3).amax(dim=1))
    return to_fp8(x, scale[:, None, :, None]), scale


def reference_fp8_forward(q8, k8, v8, used, q_scale, k_scale, v_scale):
    """What FA3's fp8 forward computes, in float32 SDPA on the dequantized inputs (the tests' kernel)."""
    q, k, v = (x.float() * s[:, None, :, None] for x, s in ((q8, q_scale), (k8, k_scale), (v8, v_scale)))
    return reference_kernel(q, k, v, used)


def reference_fp8_kernel(q, k, v, used):
    """What the fp8 kernel computes, in float32 SDPA on the dequantized fp8 inputs."""
    return quantizing(reference_fp8_forward)(q, k, v, used)


def reference_kernel(q, k, v, used):
    """What the FA3 kernel computes, through SDPA: sample b attends to its first `used[b]` keys."""
    mask = None
    if used is not None:
        mask = (torch.arange(k.shape[1], device=k.device)[None, :] < used[:, None])[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


def kept_keys_first(
    key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`key` and `value` (B x S x H x D) with each sample's kept keys first, and how many it keeps.

    `attn_mask` is a boolean key mask broadcastable to (B, 1, 1, S) (True: attend), as diffusers builds it.
    """
    b, s = key.shape[:2]
    keep = attn_mask.reshape(b, s).bool()
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    index = order[:, :, None, None].expand_as(key)

    def gather(x):  # fp8 through its bytes: gather is not defined for every fp8 dtype and device
        if x.dtype.itemsize == 1 and x.is_floating_point():
            return torch.gather(x.view(torch.uint8), 1, index).view(x.dtype)
        return torch.gather(x, 1, index)

    return gather(key), gather(value), keep.sum(dim=1, dtype=torch.int32)


def joint_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, kernel: Kernel, fallback, **kwargs
):
    """Attention of B x S x H x D tensors through `kernel`, the key mask turned into kept-key counts."""
    usable = (
        query.is_cuda
        and query.dtype in (torch.bfloat16, torch.float16)
        and dropout_p == 0.0
        and not is_causal
        and serves(kwargs.get("backend"), kwargs.get("parallel_config"))
        and (attn_mask is None or attn_mask.dtype == torch.bool)
    )
    if not usable and getattr(kernel, "hopper_only", False):  # reference kernels serve every call
        return fallback(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)
    if attn_mask is None:
        return kernel(query, key, value, None)
    key, value, used = kept_keys_first(key, value, attn_mask)
    return kernel(query, key, value, used)


def serves(backend, parallel_config) -> bool:
    """Whether FA3 may stand in for a processor's attention `backend` (no context-parallel config)."""
    return parallel_config is None and str(getattr(backend, "value", backend)) in REPLACES


def fp8_forward_now(module, hidden_states: torch.Tensor, backend, parallel_config) -> Fp8Forward | None:
    """The fp8 forward that takes prequantized inputs, when it serves this call: a request runs fp8
    attention (inside `fp8_attention()`), FA3 may stand in for `backend` (`serves`) and, for FA3's
    own kernel, the activations are on CUDA. Else None. `module`: diffusers' Qwen-Image transformer
    module, whose dispatcher global compiled blocks guard on."""
    fp8 = getattr(module, "_qie_dispatch_fp8", None)
    if fp8 is None or module.dispatch_attention_fn is not fp8 or not serves(backend, parallel_config):
        return None
    forward = getattr(module, "_qie_fp8_forward", None)
    if forward is None or (getattr(forward, "hopper_only", False) and not hidden_states.is_cuda):
        return None
    return forward


def prequantized_attention(q8, q_scale, k8, k_scale, v8, v_scale, attn_mask, forward: Fp8Forward) -> torch.Tensor:
    """Attention of fp8 queries, keys and values (B x S x H x D, [B, H] scales each), through `forward`.

    The values come scaled per sample and head (`quantize_heads`, or `qie.speed.fp8_values.join_fp8`);
    a boolean key mask becomes kept-key counts as in `joint_attention`. Returns bf16 (B x S x H x D).
    """
    used = None
    if attn_mask is not None:
        k8, v8, used = kept_keys_first(k8, v8, attn_mask)
    return forward(q8, k8, v8, used, q_scale, k_scale, v_scale)


def available(device: torch.device) -> bool:
    """True on a Hopper GPU with the `fa3-fwd` package installed."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9 and fa3_kernel() is not None


@contextlib.contextmanager
def fp8_attention() -> Iterator[None]:
    """Run the body's FA3 attention in fp8 (`fa3_fp8_kernel`); outside it, bf16 again. No-op when not installed.

    It swaps the transformer module's `dispatch_attention_fn` for the fp8 dispatcher: compiled
    blocks guard on that global, so the first fp8 call traces the fp8 graph and later calls pick
    the graph of the dispatcher in place (a flag read inside the graph is not reliably guarded).
    Like `install`, it is process-wide: qie runs one editor per process (per GPU), whose lock
    keeps one request at a time inside it.
    """
    module = importlib.import_module(QWEN_MODULE)
    fp8 = getattr(module, "_qie_dispatch_fp8", None)
    if fp8 is None:
        yield
        return
    before, module.dispatch_attention_fn = module.dispatch_attention_fn, fp8
    try:
        yield
    finally:
        module.dispatch_attention_fn = before


def install(
    device: torch.device,
    kernel: Kernel | None = None,
    fp8_kernel: Kernel | None = None,
    fp8_forward: Fp8Forward | None = None,
) -> bool:
    """Route the Qwen-Image transformer's joint attention through FA3 (or `kernel`); False if unavailable.

    `fp8_kernel` (default: FA3's fp8 forward) serves the calls made inside `fp8_attention()`;
    `fp8_forward` (default: FA3's, with FA3) serves them when the fused q/k prologue
    (`qie.speed.qk_prologue`) hands over queries and keys already in fp8.
    """
    if kernel is None and available(device):
        kernel, fp8_kernel = fa3_kernel(), fp8_kernel or fa3_fp8_kernel()
        fp8_forward = fp8_forward or fa3_fp8_forward()
    if kernel is None:
        return False
    module = importlib.import_module(QWEN_MODULE)
    original = getattr(module, "_qie_dispatch", module.dispatch_attention_fn)
    module._qie_dispatch = original

    def dispatcher(chosen: Kernel):
        def dispatch(query, key, value, **kwargs):
            return joint_attention(query, key, value, kernel=chosen, fallback=original, **kwargs)

        return dispatch

    module.dispatch_attention_fn = dispatcher(kernel)
    module._qie_dispatch_fp8 = dispatcher(fp8_kernel or kernel)
    module._qie_fp8_forward = fp8_forward
    log.info("joint attention: FlashAttention-3 forward (fa3-fwd), masks as kept-key counts")
    return True


def installed() -> bool:
    """Whether `install` routes the transformer's attention through FA3 now."""
    return hasattr(importlib.import_module(QWEN_MODULE), "_qie_dispatch")


def uninstall() -> None:
    """Give the transformer diffusers' own attention dispatcher back."""
    module = importlib.import_module(QWEN_MODULE)
    if hasattr(module, "_qie_dispatch"):
        module.dispatch_attention_fn = module._qie_dispatch
        del module._qie_dispatch, module._qie_dispatch_fp8, module._qie_fp8_forward
