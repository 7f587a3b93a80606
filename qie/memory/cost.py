"""A cost model for one denoising step: bytes streamed over PCIe against matrix work on the GPU.

The transformer forward at T tokens costs `forward_flops(T)`: linear layers (2 x 113 M weights a
token per block, 60 blocks) plus joint attention (4 x T² x 3072 per block). A plan's step time is
predicted from a `Gpu`'s dense bf16 rate, its host-to-device bandwidth and how efficiently each
kind of work runs; the efficiencies were measured on one H200 (790 TFLOP/s bf16 measured) against
the same formulas: bf16 eager linear layers 0.50 of the bf16 rate, fp8 rowwise compiled 0.97,
attention 0.82 through SDPA (0.98 through FlashAttention-3, `qie.speed.fa3`), and a masked SDPA
attention (batched CFG pads the shorter prompt) 1.56x slower than an unmasked one; FA3 takes the
mask as kept-key counts at no extra cost. Those fractions are assumed to carry over to other
GPUs: their numbers are labelled predictions.

The stream plan copies each streamed block while other blocks compute (resident blocks are
spread over the stack), so a forward takes about max(compute, copy). Both CFG branches in one
call do twice the compute but copy the weights once.

Example:
    >>> predict_stream(GPUS["h200"], streamed_gib=16.8).bound  # 53 of 60 fp8 blocks streamed
    'pcie'
    >>> predict_stream(GPUS["rtx4090"], streamed_gib=13.0).bound  # a slower GPU hides the copies
    'compute'
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GIB = 2**30
BLOCKS, DIM, TOKEN_WEIGHTS = 60, 3072, 113.2e6  # per block: 4 attention projections + the MLP, per token
TOKENS_1024 = 8192 + 230  # output + one condition image at 1024², and a typical prompt
EFF_BF16, EFF_FP8, EFF_ATTN, EFF_FA3 = 0.50, 0.97, 0.82, 0.98  # measured on an H200 (module docstring)
MASKED_ATTN = 1.56  # masked over unmasked attention time, measured on an H200 at 1024²
UPCAST_EFF = 0.2  # fraction of memory bandwidth the per-block fp8 -> bf16 upcast reaches


@dataclass(frozen=True)
class Gpu:
    """What the cost model needs to know about a GPU (datasheet numbers unless marked measured)."""

    label: str
    vram_gib: float
    pcie_gbps: float  # host -> device from pinned memory, GB/s (about 80% of the link's rate)
    tflops: float  # dense bf16 tensor rate with fp32 accumulation
    hbm_gbps: float  # device memory bandwidth
    fp8: bool  # fp8 tensor cores (compute capability >= 8.9)
    fa3: bool = False  # FlashAttention-3 runs there (Hopper, with the fa3-fwd package)


GPUS: dict[str, Gpu] = {
    "h200": Gpu("NVIDIA H200 (PCIe and bf16 rate measured)", 141, 52.0, 790, 4800, True, True),
    "h100": Gpu("NVIDIA H100 80GB SXM (PCIe measured)", 80, 55.0, 790, 3350, True, True),
    "a100-40gb": Gpu("NVIDIA A100 40GB, PCIe 4.0 x16 (prediction)", 40, 25.0, 312, 1555, False),
    "l4": Gpu("NVIDIA L4 24GB, PCIe 4.0 x16 (prediction)", 24, 25.0, 121, 300, True),
    "rtx4090": Gpu("RTX 4090 24GB, PCIe 4.0 x16 (prediction)", 24, 25.0, 165, 1008, True),
    "rtx3090": Gpu("RTX 3090 24GB, PCIe 4.0 x16 (prediction)", 24, 25.0, 71, 936, False),
    "rtx4060ti-16gb": Gpu("RTX 4060 Ti 16GB, PCIe 4.0 x8 (prediction)", 16, 12.5, 44, 288, True),
}


def forward_flops(tokens: int = TOKENS_1024) -> tuple[float, float]:
    """(linear-layer FLOPs, attention FLOPs) of one transformer forward over `tokens` tokens."""
    return 2 * TOKEN_WEIGHTS * tokens * BLOCKS, 4 * tokens**2 * DIM * BLOCKS


def compute_s(
    gpu: Gpu, tokens: int = TOKENS_1024, fp8: bool = True, batch: int = 1, masked: bool = False, fa3: bool = False
) -> float:
    """Seconds of GPU work for one forward of `batch` samples (fp8 matmuls where the GPU has them).

    `masked`: the attention has a key mask (batched CFG); `fa3`: attention through FlashAttention-3.
    """
    linear, attention = forward_flops(tokens)
    rate = gpu.tflops * 1e12
    lin_s = linear / (rate * (EFF_FP8 if fp8 and gpu.fp8 else EFF_BF16))
    attn_eff = EFF_FA3 if fa3 else EFF_ATTN / (MASKED_ATTN if masked else 1.0)
    attn_s = attention / (rate * attn_eff)
    return batch * (lin_s + attn_s)


@dataclass(frozen=True)
class Prediction:
    """Predicted seconds for one forward and one CFG step (two calls, or both branches batched)."""

    forward_s: float
    cfg_two_calls_s: float
    cfg_batched_s: float
    copy_s: float
    compute_s: float

    @property
    def bound(self) -> str:
        return "pcie" if self.copy_s > self.compute_s else "compute"

    @property
    def batch_cfg(self) -> bool:
        """Whether one batched CFG call is predicted to beat two calls."""
        return self.cfg_batched_s < self.cfg_two_calls_s

    @property
    def cfg_step_s(self) -> float:
        return min(self.cfg_two_calls_s, self.cfg_batched_s)


def predict_stream(
    gpu: Gpu, streamed_gib: float, weights_gib: float = 19.0, tokens: int = TOKENS_1024, fa3: bool = False
) -> Prediction:
    """The stream plan with `streamed_gib` of fp8 blocks crossing PCIe per forward (`fa3`: FA3 attention)."""
    copy = streamed_gib * GIB / (gpu.pcie_gbps * 1e9)
    one = compute_s(gpu, tokens, fp8=True, fa3=fa3)
    upcast = 0.0
    if not gpu.fp8:  # every block's weights upcast to bf16 before its matmuls
        upcast = 3 * weights_gib * GIB / (gpu.hbm_gbps * 1e9 * UPCAST_EFF)
    work = one + upcast
    batched = compute_s(gpu, tokens, fp8=True, batch=2, masked=True, fa3=fa3) + upcast
    return Prediction(
        forward_s=max(work, copy),
        cfg_two_calls_s=2 * max(work, copy),
        cfg_batched_s=max(batched, copy),
        copy_s=copy,
        compute_s=work,
    )


def predict_resident(gpu: Gpu, fp8: bool, tokens: int = TOKENS_1024, fa3: bool = False) -> Prediction:
    """A plan with the whole transformer on the GPU (`fp8`: quantized matmuls and compile)."""
    work = compute_s(gpu, tokens, fp8=fp8, fa3=fa3)
    batched = compute_s(gpu, tokens, fp8=fp8, batch=2, masked=True, fa3=fa3)
    return Prediction(forward_s=work, cfg_two_calls_s=2 * work, cfg_batched_s=batched, copy_s=0.0, compute_s=work)


def custom_gpu(base: Gpu, vram_gib: float, pcie_gbps: float | None, tflops: float | None) -> Gpu:
    """`base` with the budget and, where given, the PCIe bandwidth and bf16 rate replaced."""
    given = [f"{pcie_gbps:g} GB/s PCIe"] if pcie_gbps is not None else []
    given += [f"{tflops:g} TFLOP/s"] if tflops is not None else []
    return replace(
        base,
        label=f"{base.label}; given: {', '.join(given)}" if given else base.label,
        vram_gib=vram_gib,
        pcie_gbps=pcie_gbps if pcie_gbps is not None else base.pcie_gbps,
        tflops=tflops if tflops is not None else base.tflops,
    )


def detect_gpu(device, pcie_gbps: float | None = None) -> Gpu:
    """The `GPUS` entry whose name matches `device`'s (the H100's rates when none does), `pcie_gbps` if measured."""
    import torch

    name = torch.cuda.get_device_name(device).lower().replace(" ", "")
    keys = {"h200": "h200", "h100": "h100", "a100": "a100-40gb", "l4": "l4", "4090": "rtx4090", "3090": "rtx3090"}
    keys["4060ti"] = "rtx4060ti-16gb"
    base = next((GPUS[v] for k, v in keys.items() if k in name), GPUS["h100"])
    fp8 = torch.cuda.get_device_capability(device) >= (8, 9)
    gpu = replace(base, fp8=fp8) if pcie_gbps is None else replace(base, fp8=fp8, pcie_gbps=pcie_gbps)
    return replace(gpu, label=gpu.label + ("; PCIe measured at load" if pcie_gbps is not None else ""))


def predict_pipe(pipe, device, plan: str, tokens: int = TOKENS_1024, fa3: bool = False) -> tuple[Prediction, Gpu]:
    """The prediction for `pipe` as placed by `plan` on `device`: the stream plan from the bytes its
    streamer holds in host memory and the PCIe rate it measured at load, other plans as resident.
    `fa3`: attention through FlashAttention-3 (`qie.speed.fa3.installed()` says whether it is)."""
    streamer = getattr(getattr(pipe.transformer, "transformer_blocks", None), "qie_streamer", None)
    if streamer is not None:
        gpu = detect_gpu(device, streamer.pcie_gbps)
        return predict_stream(gpu, streamer.host_bytes() / GIB, tokens=tokens, fa3=fa3), gpu
    gpu = detect_gpu(device)
    return predict_resident(gpu, fp8=plan != "resident", tokens=tokens, fa3=fa3), gpu
