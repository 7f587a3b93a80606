"""Memory plans: where each component of the pipeline lives, applied once at load.

A plan is a small named config (`Plan`) with `apply(pipe, device, budget_gib)` and a prediction
of the GPU memory it needs (`need_gib`). `choose_plan(..., "auto")` walks `AUTO_ORDER` (exact
first, then smaller) and takes the first whose predicted peak fits the usable part of the budget
(free VRAM by default), logging why each earlier plan was skipped. `next_plan` gives the plan to
step down to after an OOM.

| plan | transformer | text encoder | measured at 1024² on an H100 |
|---|---|---|---|
| `resident` | bf16 on GPU | bf16 on GPU | 58.0 GiB peak, stock speed, bit-exact |
| `resident-fp8` | torchao fp8 (int8 weight-only without fp8 units) | bf16 on GPU | 39.0 GiB, 1.58x with compile |
| `fp8-te-stream` | torchao fp8 on GPU | resident if it fits, else streamed in fp8 | 20.7 GiB at 24 GiB, 1.72x (H200) |
| `stream` | fp8 rows, K blocks resident, rest streamed | streamed in fp8 | 4.3-14.5 GiB, 0.70x stock at 10 GiB |
| `model-offload` | diffusers `enable_model_cpu_offload` | same | not measured; last resort |

The two streaming plans place the text encoder and the VAE per stage from what the budget leaves
(`place_stages`, logged): the VAE runs untiled or in the largest tiles that fit (tiles of 256 px,
diffusers' default, cost 0.57 + 0.76 s per 1024² edit on an H200 against 0.08 + 0.11 s with 576 px
tiles: `benchmarks/bench-h200-placement.json`), and a text encoder that must stream is stored in fp8
(half the bytes over PCIe: 0.30 s against 0.44 s in bf16).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from qie.errors import InvalidRequestError, ResourceError
from qie.memory.placement import VAE_TILES, place_text_encoder, set_vae_tiling, stores_fp8

log = logging.getLogger(__name__)

GIB = 2**30
TOKENS_1024 = 8192  # output + one condition image at 1024²
# Peak memory above the resident weights, per stage, measured for a 1024² edit with CFG on an
# H100 (benchmarks/bench-h100-a.json, stage_peaks_gib minus resident_gib).
DENOISE_ACT_GIB_1024 = 0.75
VAE_ACT_GIB_1024 = 4.2  # VAE decode, untiled; encode needs about half
VAE_TILED_ACT_GIB = 0.6  # tiles of 256 px, diffusers' default
TEXT_ENCODER_ACT_GIB = 0.5  # the text encoder's activations (a 1024² condition and a long prompt)
# What cuBLAS workspaces, compile warm-up and the caching allocator's fragmentation take beyond
# live tensors. 0.8 GiB was too little: at a 24 GiB budget fp8-te-stream hit OOM with 22.5 GiB
# allocated and 1.55 GiB reserved but unusable, and the stream plan at 16 GiB with 15.0 + 0.9
# (benchmarks/bench-h100-e.json; the 10 and 6 GiB runs peaked 2.0 GiB above their resident
# weights). Plans also leave FRAGMENTATION of the budget free; the CLI turns on expandable
# allocator segments, which fragment far less.
OVERHEAD_GIB = 1.0
FRAGMENTATION = 0.05


@dataclass(frozen=True)
class Sizes:
    """Component sizes in GiB (bf16 weights) and the token count that sets the activations."""

    blocks: list[float]  # transformer blocks, bf16
    blocks_fp8: list[float]  # transformer blocks, fp8 rows
    transformer_rest: float  # embeddings, norms, projections outside the blocks
    text_encoder: float
    text_encoder_layer: float  # the largest streamed text-encoder layer
    text_encoder_embed: float  # token embedding; the LM head has the same size (streamed: on the GPU for its call)
    vae: float
    tokens: int = TOKENS_1024
    upcast: bool = True  # streamed fp8 rows are upcast into a bf16 workspace (GPUs without fp8 units)
    text_encoder_in_fp8: bool = False  # already stored in fp8 (`text_encoder` counts it at one byte)
    cfg_batch: int = 1  # samples per transformer call: batched CFG (stream plan) makes it 2

    @property
    def transformer(self) -> float:
        return sum(self.blocks) + self.transformer_rest

    def denoise_act(self) -> float:
        return max(0.3, DENOISE_ACT_GIB_1024 * self.cfg_batch * self.tokens / TOKENS_1024)

    def vae_act(self, tile: int | None) -> float:
        """VAE activation memory: untiled (`tile` None) it grows with the image, tiled with the tile's area."""
        if tile is None:
            return VAE_ACT_GIB_1024 * self.tokens / TOKENS_1024
        return max(VAE_TILED_ACT_GIB, VAE_ACT_GIB_1024 * tile**2 / 1024**2)

    @property
    def text_encoder_fp8(self) -> float:
        """The text encoder stored in fp8 (`store_text_encoder_fp8`): embedding and LM head stay bf16."""
        if self.text_encoder_in_fp8:
            return self.text_encoder
        return (self.text_encoder - 2 * self.text_encoder_embed) / 2 + 2 * self.text_encoder_embed

    def text_encoder_stream(self) -> float:
        """Text-encoder memory while it streams: two layers or the LM head in flight, activations."""
        # `text_encoder_embed` stands for the LM head (the same size): an edit brings neither it nor
        # the embedding to the GPU (the embedding is looked up on the host, `encode_prompt` skips the
        # head), but the prompt rewriter's `generate` copies the head in for each token, under the
        # same plan, so it stays counted.
        return max(2 * self.text_encoder_layer, self.text_encoder_embed) + TEXT_ENCODER_ACT_GIB


# Qwen-Image-Edit-2509 at full size (measured with `measure_sizes` on a meta-device build; checked by a test).
FULL_SIZE = Sizes(
    blocks=[0.632985] * 60,
    blocks_fp8=[0.316922] * 60,
    transformer_rest=0.0755,
    text_encoder=15.445,
    text_encoder_layer=0.4341,
    text_encoder_embed=1.0151,
    vae=0.2364,
)


@dataclass(frozen=True)
class Plan:
    """A named placement of the pipeline on a device."""

    name: str
    description: str
    apply: Callable[..., None]
    need_gib: Callable[[Sizes], float]  # smallest predicted peak for this plan
    needs_cuda: bool = True
    notes: list[str] = field(default_factory=list)


def measure_sizes(pipe, tokens: int = TOKENS_1024, device: torch.device | None = None) -> Sizes:
    """Component sizes of `pipe` (counted in bf16 whatever the current dtype; weights already stored in fp8,
    such as the text encoder's with `text_encoder_fp8`, at one byte).

    With `device`, whether the stream plan there multiplies fp8 rows directly (no upcast workspace).
    """
    from qie.memory.fp8_matmul import fp8_available
    from qie.memory.streaming import block_bytes

    def gib(module) -> float:
        return sum(p.numel() * (1 if p.element_size() == 1 else 2) for p in module.parameters()) / GIB

    blocks = pipe.transformer.transformer_blocks
    te_layers = _text_encoder_layers(pipe.text_encoder)
    return Sizes(
        blocks=[b / GIB for b in block_bytes(blocks, "bf16")],
        blocks_fp8=[b / GIB for b in block_bytes(blocks, "fp8")],
        transformer_rest=gib(pipe.transformer) - sum(gib(b) for b in blocks),
        text_encoder=gib(pipe.text_encoder),
        text_encoder_layer=max((gib(layer) for layer in te_layers), default=0.0),
        text_encoder_embed=gib(pipe.text_encoder.get_input_embeddings()),
        vae=gib(pipe.vae),
        tokens=tokens,
        upcast=device is None or not fp8_available(device),
        text_encoder_in_fp8=stores_fp8(pipe.text_encoder),
    )


def _text_encoder_layers(text_encoder) -> list[torch.nn.Module]:
    lm = getattr(getattr(text_encoder, "model", text_encoder), "language_model", None)
    return list(getattr(lm, "layers", []))


# -- apply functions ---------------------------------------------------------------------------


def _resident(pipe, device: torch.device, budget_gib: float | None) -> None:
    pipe.to(device)


def _resident_fp8(pipe, device: torch.device, budget_gib: float | None) -> None:
    from qie.memory.quantize import quantize_transformer

    pipe.to(device)
    quantize_transformer(pipe.transformer, device)


@dataclass(frozen=True)
class StagePlacement:
    """Where the text encoder runs ("resident", "resident-fp8", "stream-fp8", "stream"), the VAE's tile
    side (None: untiled) and the predicted peak in GiB."""

    text_encoder: str
    vae_tile: int | None
    peak_gib: float

    def describe(self) -> str:
        vae = "untiled" if self.vae_tile is None else f"in {self.vae_tile}-px tiles"
        return f"text encoder {self.text_encoder}, VAE {vae} (predicted peak {self.peak_gib:.1f} GiB)"


def place_stages(s: Sizes, budget_gib: float, fp8: bool = True) -> StagePlacement:
    """Text encoder and VAE placement beside the fp8 transformer of `fp8-te-stream`, within `budget_gib`.

    In order of what each choice gains per edit (H200, 1024²): the largest VAE tiles that fit
    (576 px instead of 256 saves ~1.1 s), then the text encoder resident (bf16, else fp8; saves the
    ~0.3 s it takes to stream), then the VAE untiled (~0.05 s). A streamed text encoder is stored in
    fp8 when `fp8` (half the PCIe bytes).

    Example:
        >>> place_stages(FULL_SIZE, 24).describe()
        'text encoder stream-fp8, VAE in 576-px tiles (predicted peak 21.8 GiB)'
    """
    room = usable(budget_gib)
    streamed = "stream-fp8" if fp8 else "stream"
    te_weights = {"resident": s.text_encoder, "resident-fp8": s.text_encoder_fp8, streamed: 0.0}

    def peak(te: str, tile: int | None) -> float:
        te_act = s.text_encoder_stream() if te == streamed else TEXT_ENCODER_ACT_GIB
        stage = max(s.denoise_act(), te_act, s.vae_act(tile))
        return _fp8_te_stream_weights(s) + te_weights[te] + stage + OVERHEAD_GIB

    tile = next((t for t in VAE_TILES if peak(streamed, t) <= room), VAE_TILES[-1])
    te = next((t for t in ("resident", "resident-fp8") if peak(t, tile) <= room), streamed)
    if peak(te, None) <= room:
        tile = None
    return StagePlacement(te, tile, peak(te, tile))


def stream_stages(s: Sizes, resident: int, fp8: bool = True) -> StagePlacement:
    """The stream plan's stages: the text encoder streamed (fp8 storage when `fp8`), the VAE in the largest
    tiles whose activations fit under the denoising stage's peak (free: no resident block given up)."""
    tile = vae_tile_within(s, _stream_stage(s) - 0.001)
    peak = _stream_fixed(s) + sum(s.blocks_fp8[:resident])
    return StagePlacement("stream-fp8" if fp8 else "stream", tile, peak)


def stages_for(plan: str, s: Sizes, budget_gib: float, fp8: bool = True) -> StagePlacement | None:
    """Where `plan` puts the text encoder and the VAE at `budget_gib`; None for the resident plans
    (both on the GPU, the VAE untiled) and model-offload."""
    if plan == "fp8-te-stream":
        return place_stages(s, budget_gib, fp8)
    if plan == "stream":
        return stream_stages(s, resident_blocks(s, budget_gib), fp8)
    return None


def vae_tile_within(s: Sizes, room_gib: float) -> int | None:
    """The largest VAE choice (untiled, then `VAE_TILES`) whose activations fit `room_gib` (else the smallest tile)."""
    return next((t for t in (None, *VAE_TILES) if s.vae_act(t) <= room_gib), VAE_TILES[-1])


def _fp8_te_stream(pipe, device: torch.device, budget_gib: float | None) -> None:
    from qie.memory.quantize import quantize_transformer

    sizes = measure_sizes(pipe, device=device)
    budget = budget_gib if budget_gib is not None else free_gib(device)
    placed = place_stages(sizes, budget, fp8=device.type == "cuda")
    log.info("fp8-te-stream at %.1f GiB: %s", budget, placed.describe())
    pipe.transformer.to(device)
    pipe.vae.to(device)
    quantize_transformer(pipe.transformer, device)
    place_text_encoder(pipe, device, placed.text_encoder)
    set_vae_tiling(pipe.vae, placed.vae_tile)
    pipe.qie_placement = placed


def _stream(pipe, device: torch.device, budget_gib: float | None) -> None:
    from qie.memory.streaming import BlockStreamer

    sizes = measure_sizes(pipe, device=device)
    budget = budget_gib if budget_gib is not None else free_gib(device)
    if _stream_fixed(sizes) > usable(budget):  # not even this plan fits: say which budget would
        pick_plan(sizes, budget, given=budget_gib is not None)
    resident = resident_blocks(sizes, budget)
    blocks = pipe.transformer.transformer_blocks
    # Blocks are placed by the streamer; everything else of the transformer goes to the GPU.
    for name, child in pipe.transformer.named_children():
        if name != "transformer_blocks":
            child.to(device)
    BlockStreamer(blocks, device, resident=resident, storage="fp8", compute_dtype=pipe.transformer.dtype)
    pipe.vae.to(device)
    placed = stream_stages(sizes, resident, fp8=device.type == "cuda")
    set_vae_tiling(pipe.vae, placed.vae_tile)
    place_text_encoder(pipe, device, placed.text_encoder)
    log.info("stream at %.1f GiB: %d of %d blocks resident, %s", budget, resident, len(blocks), placed.describe())
    pipe.qie_placement = placed


def _model_offload(pipe, device: torch.device, budget_gib: float | None) -> None:
    # diffusers' own hook: each component moves to the GPU for its stage, then back to the host.
    pipe.enable_model_cpu_offload(device=device)


def _resident_need(s: Sizes) -> float:
    weights = s.transformer + s.text_encoder + s.vae
    return weights + max(s.denoise_act(), s.vae_act(None)) + OVERHEAD_GIB


def _resident_fp8_need(s: Sizes) -> float:
    weights = sum(s.blocks_fp8) + s.transformer_rest + s.text_encoder + s.vae
    return weights + max(s.denoise_act(), s.vae_act(None)) + OVERHEAD_GIB


def _fp8_te_stream_weights(s: Sizes) -> float:
    return sum(s.blocks_fp8) + s.transformer_rest + s.vae


def _fp8_te_stream_need(s: Sizes) -> float:
    stage = max(s.denoise_act(), s.vae_act(VAE_TILES[-1]), s.text_encoder_stream())
    return _fp8_te_stream_weights(s) + stage + OVERHEAD_GIB


def _stream_stage(s: Sizes) -> float:
    """The stream plan's denoising stage beside its resident blocks: activations (batched CFG: 2x) and buffers."""
    s = replace(s, cfg_batch=2)
    buffers = 2 * max(s.blocks_fp8) + (max(s.blocks) if s.upcast else 0)  # two blocks in flight (+ upcast)
    return s.denoise_act() + buffers


def _stream_fixed(s: Sizes) -> float:
    """What the stream plan needs besides resident blocks: the largest stage's activations, small parts."""
    stage = max(_stream_stage(s), s.vae_act(VAE_TILES[-1]), s.text_encoder_stream())
    return s.transformer_rest + s.vae + stage + OVERHEAD_GIB


def _model_offload_need(s: Sizes) -> float:
    return max(s.transformer + s.denoise_act(), s.text_encoder, s.vae + s.vae_act(None)) + OVERHEAD_GIB


def usable(budget_gib: float) -> float:
    """The part of a memory budget plans may fill (the rest absorbs allocator fragmentation)."""
    return budget_gib * (1 - FRAGMENTATION)


def resident_blocks(s: Sizes, budget_gib: float) -> int:
    """How many fp8 blocks fit on the GPU next to the stream plan's fixed needs."""
    room = usable(budget_gib) - _stream_fixed(s)
    count = 0
    for size in s.blocks_fp8:
        if room < size:
            break
        room -= size
        count += 1
    return count


PLANS: dict[str, Plan] = {
    p.name: p
    for p in [
        Plan(
            "resident",
            "every component on the GPU in bf16 (stock diffusers numerics)",
            _resident,
            _resident_need,
            needs_cuda=False,
        ),
        Plan(
            "resident-fp8",
            "transformer in torchao fp8 (rowwise, dynamic activations), the rest bf16 on the GPU",
            _resident_fp8,
            _resident_fp8_need,
        ),
        Plan(
            "fp8-te-stream",
            "transformer in torchao fp8 on the GPU, text encoder streamed from pinned host memory",
            _fp8_te_stream,
            _fp8_te_stream_need,
        ),
        Plan(
            "stream",
            "fp8-row transformer blocks: as many resident as fit, the rest streamed; text encoder streamed",
            _stream,
            _stream_fixed,
        ),
        Plan(
            "model-offload",
            "components moved to the GPU one stage at a time (diffusers enable_model_cpu_offload)",
            _model_offload,
            _model_offload_need,
        ),
    ]
}

# Tried in this order by "auto": exact and fast first, then smaller.
AUTO_ORDER = ["resident", "fp8-te-stream", "stream"]


def free_gib(device: torch.device) -> float:
    """Free memory on `device` in GiB (as the CUDA driver reports it)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free / GIB


def choose_plan(pipe, device: torch.device, plan: str = "auto", budget_gib: float | None = None) -> Plan:
    """The plan named `plan`, or with "auto" the first of `AUTO_ORDER` whose predicted peak fits."""
    if plan != "auto":
        if plan not in PLANS:
            raise InvalidRequestError("plan", plan, f"use 'auto' or one of {sorted(PLANS)}")
        chosen = PLANS[plan]
        if chosen.needs_cuda and device.type != "cuda":
            raise InvalidRequestError("plan", plan, "this plan needs a CUDA GPU; use plan='resident' on CPU")
        return chosen
    if device.type != "cuda":
        return PLANS["resident"]
    budget = budget_gib if budget_gib is not None else free_gib(device)
    return pick_plan(measure_sizes(pipe, device=device), budget, given=budget_gib is not None)


def pick_plan(sizes: Sizes, budget_gib: float, given: bool = True, budget_name: str = "vram_budget_gib") -> Plan:
    """The first plan of `AUTO_ORDER` whose predicted peak fits `budget_gib`, each skip logged.

    When none fits, the error names the smallest budget that works (`budget_name`: the parameter
    as the caller's interface spells it; `given` False: the budget was the free VRAM).
    """
    for name in AUTO_ORDER:
        need = PLANS[name].need_gib(sizes)
        if need <= usable(budget_gib):
            log.info("memory plan %r: predicted peak %.1f GiB fits the %.1f GiB budget", name, need, budget_gib)
            return PLANS[name]
        log.info("memory plan %r skipped: predicted peak %.1f GiB > %.1f GiB budget", name, need, budget_gib)
    smallest = min(PLANS[n].need_gib(sizes) for n in AUTO_ORDER)
    works = math.ceil(smallest / (1 - FRAGMENTATION) * 10) / 10
    what = f"{budget_name}={budget_gib:g}" if given else f"{budget_gib:.1f} GiB of free GPU memory"
    raise ResourceError(
        f"no memory plan fits {what}: the smallest plan ('stream') needs a budget of at least {works:.1f} GiB "
        f"at this resolution (~{smallest:.1f} GiB peak); give {budget_name}={works:.1f} or more, free GPU memory, "
        "or lower the output size"
    )


def batch_cfg_pays(pipe, device: torch.device, plan: str, fa3: bool = False) -> bool:
    """Whether running both CFG branches in one call is predicted faster than two calls (`qie.memory.cost`).

    Only the stream plan can gain (its weights cross PCIe once per step instead of twice); with
    resident weights a step is compute-bound and, through SDPA, the masked attention of the padded
    batch costs more. `fa3`: attention runs through FlashAttention-3, where masks cost nothing.
    """
    from qie.memory.cost import predict_pipe

    streamer = getattr(getattr(pipe.transformer, "transformer_blocks", None), "qie_streamer", None)
    if plan != "stream" or device.type != "cuda" or streamer is None:
        return False
    p, gpu = predict_pipe(pipe, device, plan, fa3=fa3)
    log.info(
        "batched CFG %s: predicted CFG step %.3fs batched vs %.3fs as two calls (%s, %.0f GB/s PCIe)",
        "on" if p.batch_cfg else "off",
        p.cfg_batched_s,
        p.cfg_two_calls_s,
        gpu.label,
        gpu.pcie_gbps,
    )
    return p.batch_cfg


def next_plan(name: str) -> str | None:
    """The plan to step down to after an out-of-memory error in `name` (None: nothing smaller)."""
    order = ["resident", "resident-fp8", "fp8-te-stream", "stream"]
    if name not in order or name == order[-1]:
        return None
    return order[order.index(name) + 1]
