"""The four stages of one edit, as plain functions over a diffusers `QwenImageEditPlusPipeline`.

They do what the pipeline's `__call__` does, in the same order and with the same tensors, split
so that caches, early exit, tiling and memory plans can each plug into one stage. The model code
(transformer, VAE, text encoder, scheduler) is the pipeline's own.

One deliberate difference, behind a switch: `encode_prompt` forwards the processor's
`mm_token_type_ids` to the text encoder (see `encode_prompt`).
"""

from __future__ import annotations

import copy
import inspect
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
    CONDITION_IMAGE_SIZE,
    VAE_IMAGE_SIZE,
    calculate_dimensions,
    calculate_shift,
    retrieve_latents,
    retrieve_timesteps,
)
from PIL import Image

from qie.errors import CancelledError, InvalidRequestError
from qie.memory.tiling import Tiling, tiled_decode, tiled_encode
from qie.speed.early_exit import StepObserver
from qie.speed.transformer_graphs import TransformerGraphs
from qie.telemetry import step_range

log = logging.getLogger(__name__)

IMAGE_PROMPT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
MAX_PROMPT_TOKENS = 1024  # the pipeline's tokenizer_max_length

StepCallback = Callable[[int, int], None]
# (pipe, model_input, timestep, prompt, negative, img_shapes, true_cfg_scale) -> velocity
Predictor = Callable[..., torch.Tensor]


@dataclass
class PromptEmbeds:
    """Text-encoder output for one prompt: embeddings and mask (None when nothing is padded)."""

    embeds: torch.Tensor
    mask: torch.Tensor | None


@dataclass
class Condition:
    """The VAE-encoded input images, packed as transformer tokens, and their token grids."""

    latents: torch.Tensor
    shapes: list[tuple[int, int, int]]


def prompt_images(pipe, images: Sequence[Image.Image]) -> list[Image.Image]:
    """The input images as the text encoder sees them: ~384² area, aspect kept."""
    out = []
    for img in images:
        w, h = calculate_dimensions(CONDITION_IMAGE_SIZE, img.width / img.height)
        out.append(pipe.image_processor.resize(img, h, w))
    return out


def encode_prompt(
    pipe,
    prompt: str,
    images: Sequence[Image.Image],
    *,
    device: torch.device,
    forward_mm_token_type_ids: bool = True,
) -> PromptEmbeds:
    """Run the Qwen2.5-VL text encoder on the templated prompt and the (small) input images.

    Only the last hidden states are read, so the base model runs without the LM head
    (`hidden_state_model`); the result is bit-identical to the full model's.

    With transformers 5.x the processor returns `mm_token_type_ids`, which Qwen2.5-VL needs to
    build its 3-D M-RoPE positions for image tokens; stock diffusers (<= 0.42) does not pass it
    and the encoder silently falls back to sequential positions (diffusers issue #14194). qie
    passes it when the processor returns it and the encoder accepts it. Remove this once the
    upstream pipeline forwards it (tests/test_prompt_encoding.py will say so).
    """
    template = pipe.prompt_template_encode
    drop = pipe.prompt_template_encode_start_idx
    image_prompt = "".join(IMAGE_PROMPT.format(i + 1) for i in range(len(images)))
    with step_range("processor"):
        inputs = pipe.processor(
            text=[template.format(image_prompt + prompt)],
            images=list(images) or None,
            padding=True,
            return_tensors="pt",
        )
    n_tokens = int(inputs["attention_mask"].sum())  # counted on the host, before anything reaches the GPU
    if n_tokens > MAX_PROMPT_TOKENS:
        raise InvalidRequestError(
            "prompt", f"<{n_tokens} tokens with images>", f"shorten it: at most {MAX_PROMPT_TOKENS} tokens"
        )
    # One prompt has no padding: without a mask the attention is the same causal attention, and neither
    # transformers nor the slicing below reads the mask back from the GPU.
    every_token = n_tokens == inputs["attention_mask"].numel()
    with step_range("prompt-upload"):
        inputs = inputs.to(device)
    encoder = hidden_state_model(pipe.text_encoder)
    full_model = _accepts(encoder, "logits_to_keep")  # the full model (see `hidden_state_model`)
    extra = {}
    if full_model:
        extra["logits_to_keep"] = 1  # only hidden states are used; skip the 152k-vocab logits
        extra["output_hidden_states"] = True  # its output has no `last_hidden_state`
    if forward_mm_token_type_ids and "mm_token_type_ids" in inputs and _accepts(encoder, "mm_token_type_ids"):
        extra["mm_token_type_ids"] = inputs["mm_token_type_ids"]
    with step_range("text-encoder"):
        out = encoder(
            input_ids=inputs["input_ids"],
            attention_mask=None if every_token else inputs["attention_mask"],
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            **extra,
        )
    # The last layer's output after the final norm: diffusers' `hidden_states[-1]` is the same tensor.
    last = (out.hidden_states[-1] if full_model else out.last_hidden_state)[0]
    hidden = (last if every_token else last[inputs["attention_mask"][0].bool()])[drop:]
    embeds = hidden.unsqueeze(0).to(dtype=pipe.text_encoder.dtype, device=device)
    # A single unpadded prompt: the pipeline turns an all-ones mask into None.
    return PromptEmbeds(embeds=embeds, mask=None)


def hidden_state_model(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The module `encode_prompt` runs: the text encoder's base model, which returns the hidden states
    without the LM head, so an edit never runs (nor, when streamed, copies in) the 1 GiB head.

    `Qwen2_5_VLForConditionalGeneration.forward` calls its `.model` (`Qwen2_5_VLModel`) with the
    same inputs and then applies the head, so the hidden states are the same tensors bit for bit.
    The full model is returned instead when there is no `.model`, and when hooks sit on the full
    model's own forward that an edit must pass through: accelerate's offload hook (the
    model-offload plan's `enable_model_cpu_offload` moves the encoder to the GPU in it), a diffusers
    hook, or forward (pre-)hooks such as an armed `qie.core.faults` fault.

    Example:
        >>> type(hidden_state_model(pipe.text_encoder)).__name__  # doctest: +SKIP
        'Qwen2_5_VLModel'
    """
    base = getattr(text_encoder, "model", None)
    if not isinstance(base, torch.nn.Module):  # not a Qwen2.5-VL-style wrapper: run it whole
        return text_encoder
    hooked = (
        hasattr(text_encoder, "_hf_hook")
        or hasattr(text_encoder, "_diffusers_hook")
        or text_encoder._forward_pre_hooks
        or text_encoder._forward_hooks
    )
    return text_encoder if hooked else base


def _accepts(module: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(module.forward).parameters


def encode_condition(
    pipe,
    images: Sequence[Image.Image],
    *,
    device: torch.device,
    dtype: torch.dtype,
    area: int = VAE_IMAGE_SIZE,
    tile: Tiling | None = None,
) -> Condition:
    """VAE-encode each input image at ~`area` pixels (the pipeline's 1024²) and pack the latents.

    With `tile`, the VAE runs on Hann-blended tiles (`qie.memory.tiling`).
    """
    factor = pipe.vae_scale_factor
    latents, shapes = [], []
    for img in images:
        w, h = calculate_dimensions(area, img.width / img.height)
        with step_range("to-pixels"):
            pixels = to_pixels(pipe.image_processor, img, h, w, device=device, dtype=dtype)
        with step_range("vae-encode"):
            lat = _encode_latents(pipe.vae, pixels) if tile is None else _tiled_encode_latents(pipe.vae, pixels, tile)
        lh, lw = lat.shape[3:]
        latents.append(pipe._pack_latents(lat, 1, pipe.latent_channels, lh, lw))
        shapes.append((1, h // factor // 2, w // factor // 2))
    return Condition(latents=torch.cat(latents, dim=1), shapes=shapes)


def to_pixels(
    processor, image: Image.Image, height: int, width: int, *, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """`image` as the VAE's input, (1, 3, 1, H, W) in [-1, 1] on `device` in `dtype`: equal bit for bit to
    diffusers' `processor.preprocess(image, height, width)` moved there.

    The resize stays diffusers' (PIL, on the host); the 8-bit pixels then go to the device, a quarter
    of the float image's bytes, and the division by 255 and the scaling to [-1, 1] run there, each
    rounded as numpy and diffusers round them (a tensor divisor: CUDA divides a CPU scalar by
    multiplying with its reciprocal). A processor configured otherwise, or a non-RGB image, goes to
    diffusers.

    Example:
        >>> from diffusers.image_processor import VaeImageProcessor
        >>> white = Image.new("RGB", (32, 32), "white")
        >>> to_pixels(VaeImageProcessor(), white, 32, 32, device=torch.device("cpu"), dtype=torch.float32).shape
        torch.Size([1, 3, 1, 32, 32])
    """
    cfg = processor.config
    converts = cfg.do_binarize or cfg.do_convert_rgb or cfg.do_convert_grayscale
    plain = cfg.do_resize and cfg.do_normalize and not converts
    if not plain or image.mode != "RGB":
        return processor.preprocess(image, height, width).unsqueeze(2).to(device=device, dtype=dtype)
    height, width = processor.get_default_height_width(image, height, width)
    pixels = torch.from_numpy(np.array(processor.resize(image, height, width))).to(device)
    unit = pixels.permute(2, 0, 1)[None].float() / torch.tensor(255.0, device=device)
    return (2.0 * unit - 1.0).unsqueeze(2).to(dtype)


def prepare_noise(
    pipe, width: int, height: int, *, device: torch.device, dtype: torch.dtype, generator: torch.Generator
) -> torch.Tensor:
    """The packed starting noise for a `width` x `height` output, drawn from `generator`."""
    channels = pipe.transformer.config.in_channels // 4
    noise, _ = pipe.prepare_latents(None, 1, channels, height, width, dtype, device, generator)
    return noise


def timesteps_for(pipe, steps: int, seq_len: int, device: torch.device, scheduler=None) -> torch.Tensor:
    """The scheduler's timesteps for `steps` steps at `seq_len` output tokens (dynamic shift), set on
    `scheduler` (default: the pipeline's)."""
    scheduler = scheduler or pipe.scheduler
    sigmas = np.linspace(1.0, 1 / steps, steps)
    cfg = scheduler.config
    mu = calculate_shift(
        seq_len,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.15),
    )
    timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
    scheduler.set_begin_index(0)
    return timesteps


@dataclass
class Encoded:
    """One request's encodings: prompt and (with CFG) negative prompt embeddings, condition latents."""

    prompt: PromptEmbeds
    negative: PromptEmbeds | None
    condition: Condition


@dataclass
class DenoiseInputs:
    """Everything the denoising loop reads, stacked along the batch (see `prepare`).

    `latents` is the starting noise, (B, tokens, C); prompts are padded to one length with a mask;
    every sample shares the output size, steps, CFG and condition token grids.
    """

    latents: torch.Tensor
    condition: Condition
    prompt: PromptEmbeds
    negative: PromptEmbeds | None
    width: int
    height: int
    steps: int
    true_cfg_scale: float


@dataclass
class LoopControl:
    """What may watch or steer the loop: progress, cancel, the early-exit observer, another predictor.

    `predict` replaces the guided prediction of one step (default `guided_prediction`; CFG-parallel
    passes its own, see `qie.serving.parallel`). `observer` (qie.speed.early_exit) sees each step
    and may stop the loop with the latents to decode.
    """

    on_step: StepCallback | None = None
    cancel: threading.Event | None = None
    observer: StepObserver | None = None
    predict: Predictor | None = None


def pad_prompts(prompts: Sequence[PromptEmbeds]) -> PromptEmbeds:
    """Stack prompt embeddings, zero-padded to the longest, with a mask (None when none is padded).

    The same padding and mask as diffusers' `_get_qwen_prompt_embeds` for a list of prompts; one
    prompt comes back as it is.
    """
    return prompts[0] if len(prompts) == 1 else stack_prompts(prompts)


def prepare(
    pipe,
    encoded: Sequence[Encoded],
    seeds: Sequence[int],
    *,
    width: int,
    height: int,
    steps: int,
    true_cfg_scale: float,
) -> DenoiseInputs:
    """Stack the encodings of a batch and draw each sample's starting noise from its own seed.

    The noise is drawn on the CPU (the same on every device) and placed like the prompt embeddings.
    """
    prompt = pad_prompts([e.prompt for e in encoded])
    negative = None if encoded[0].negative is None else pad_prompts([e.negative for e in encoded])
    condition = Condition(latents=torch.cat([e.condition.latents for e in encoded]), shapes=encoded[0].condition.shapes)
    embeds = prompt.embeds
    noise = torch.cat(
        [
            prepare_noise(
                pipe,
                width,
                height,
                device=embeds.device,
                dtype=embeds.dtype,
                generator=torch.Generator("cpu").manual_seed(seed),
            )
            for seed in seeds
        ]
    )
    return DenoiseInputs(noise, condition, prompt, negative, width, height, steps, true_cfg_scale)


def denoise(pipe, inputs: DenoiseInputs, control: LoopControl | None = None) -> torch.Tensor:
    """Run the flow-matching loop over `inputs`; true CFG (with the pipeline's norm rescale) when
    `inputs.negative` is set. Returns the final latents, (B, tokens, C).
    """
    control = control or LoopControl()
    latents, condition, observer, on_step = inputs.latents, inputs.condition, control.observer, control.on_step
    factor = pipe.vae_scale_factor
    out_shape = (1, inputs.height // factor // 2, inputs.width // factor // 2)
    img_shapes = [[out_shape, *condition.shapes]] * latents.shape[0]
    predict = control.predict or guided_prediction
    with step_range("timesteps"):
        timesteps = timesteps_for(pipe, inputs.steps, latents.shape[1], latents.device)
    sigmas: list[float] = []
    if observer is not None:  # the same schedule set on the CPU: reading the device's sigmas waits for the GPU
        host = copy.copy(pipe.scheduler)
        timesteps_for(pipe, inputs.steps, latents.shape[1], torch.device("cpu"), scheduler=host)
        sigmas = host.sigmas.tolist()
    n_out = latents.shape[1]
    for i, t in enumerate(timesteps):
        if control.cancel is not None and control.cancel.is_set():
            raise CancelledError(f"cancelled after {i} of {len(timesteps)} steps")
        model_input = torch.cat([latents, condition.latents], dim=1)
        timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
        pred = predict(pipe, model_input, timestep, inputs.prompt, inputs.negative, img_shapes, inputs.true_cfg_scale)
        pred = pred[:, :n_out]
        # --- per-step observation / early stop (qie.speed.early_exit) ---
        if observer is not None:
            final = observer.after_step(i, latents, pred, sigmas[i])
            if final is not None:
                if on_step is not None:
                    on_step(len(timesteps), len(timesteps))
                return final
        # ---
        latents = pipe.scheduler.step(pred, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return latents if observer is None else observer.finish(latents)


def guided_prediction(
    pipe, model_input, timestep, prompt: PromptEmbeds, negative: PromptEmbeds | None, img_shapes, true_cfg_scale: float
) -> torch.Tensor:
    """One step's velocity: the conditional prediction, guided by the negative one when given."""
    pred = _predict(pipe, "cond", model_input, timestep, prompt, img_shapes)
    if negative is None:
        return pred
    return cfg_combine(pred, _predict(pipe, "uncond", model_input, timestep, negative, img_shapes), true_cfg_scale)


class BatchedCfg:
    """A `Predictor` that runs both CFG branches as one transformer call of twice the batch.

    The prompt and negative embeddings are zero-padded to one length with masks (padded text
    tokens are masked out of attention), so each branch sees what it sees alone, up to the
    rounding of batched kernels (tolerance "batched-cfg"). Every weight is read once per step
    instead of twice, which matters most when weights stream over PCIe. If the doubled batch runs
    out of GPU memory, it logs a warning and runs two calls from then on.
    """

    def __init__(self) -> None:
        self.two_calls = False

    def __call__(
        self, pipe, model_input, timestep, prompt: PromptEmbeds, negative: PromptEmbeds | None, img_shapes, scale
    ) -> torch.Tensor:
        if negative is None or self.two_calls:
            return guided_prediction(pipe, model_input, timestep, prompt, negative, img_shapes, scale)
        both = stack_prompts([prompt, negative])
        try:
            pred = _predict(
                pipe, "cfg", torch.cat([model_input] * 2), torch.cat([timestep] * 2), both, [*img_shapes] * 2
            )
        except torch.OutOfMemoryError:
            self.two_calls = True
        if self.two_calls:  # outside the except: the failed call's tensors are freed
            log.warning("batched CFG ran out of GPU memory; running the two CFG branches as separate calls")
            torch.cuda.empty_cache()
            return guided_prediction(pipe, model_input, timestep, prompt, negative, img_shapes, scale)
        cond, uncond = pred.chunk(2)
        return cfg_combine(cond, uncond, scale)


def stack_prompts(prompts: Sequence[PromptEmbeds]) -> PromptEmbeds:
    """Concatenate prompt batches along the batch, zero-padded to the longest with a mask (None if none padded)."""
    longest = max(p.embeds.shape[1] for p in prompts)
    embeds, masks = [], []
    for p in prompts:
        b, n, d = p.embeds.shape
        embeds.append(torch.cat([p.embeds, p.embeds.new_zeros(b, longest - n, d)], dim=1))
        mask = p.mask if p.mask is not None else torch.ones(b, n, dtype=torch.long, device=p.embeds.device)
        masks.append(torch.cat([mask.long(), mask.new_zeros(b, longest - n).long()], dim=1))
    # Decided on the host: `mask.all()` on the GPU would synchronize every step.
    padded = any(p.mask is not None or p.embeds.shape[1] < longest for p in prompts)
    return PromptEmbeds(embeds=torch.cat(embeds), mask=torch.cat(masks) if padded else None)


def cfg_combine(pred: torch.Tensor, neg: torch.Tensor, true_cfg_scale: float) -> torch.Tensor:
    """True CFG with the pipeline's rescale: the guided velocity keeps the conditional one's norm."""
    combined = neg + true_cfg_scale * (pred - neg)
    return combined * (torch.norm(pred, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))


class GraphedPrediction:
    """A `Predictor` for one edit that replays the transformer's CUDA graph where one serves the call
    (`qie.speed.transformer_graphs`): one branch (no CFG), a prompt without a mask. `variant` names what
    the request changed in the transformer (its mode and quantized attention). Other calls run as
    `guided_prediction` runs them.
    """

    def __init__(self, graphs: TransformerGraphs, edit: int, variant: tuple) -> None:
        self.graphs, self.edit, self.variant = graphs, edit, variant
        self.calls: dict[str, int] = {}  # what the graphs did with this edit's calls, by `graphs.last`

    def __call__(
        self, pipe, model_input, timestep, prompt: PromptEmbeds, negative: PromptEmbeds | None, img_shapes, scale
    ) -> torch.Tensor:
        if negative is not None or prompt.mask is not None:
            self._count("as it is")
            return guided_prediction(pipe, model_input, timestep, prompt, negative, img_shapes, scale)
        shapes = tuple(tuple(map(tuple, sample)) for sample in img_shapes)

        def forward(hidden_states, timestep, encoder_hidden_states):
            return _transformer(pipe.transformer, hidden_states, timestep, encoder_hidden_states, None, img_shapes)

        out = self.graphs(
            self.edit,
            forward,
            (*self.variant, shapes),
            hidden_states=model_input,
            timestep=timestep,
            encoder_hidden_states=prompt.embeds,
        )
        self._count(self.graphs.last or "as it is")
        return out

    def note(self) -> str:
        """What the graphs did for this edit, for its result's notes.

        Example:
            >>> p = GraphedPrediction(None, 1, ()); p.calls = {"recorded": 1, "replayed": 3}; p.note()
            'transformer CUDA graphs: 4 of 4 calls replayed (recorded in this edit)'
        """
        total = sum(self.calls.values())
        replayed = self.calls.get("replayed", 0) + self.calls.get("recorded", 0)
        if not replayed:
            if self.graphs.disabled:
                return f"transformer CUDA graphs off ({self.graphs.disabled}): {total} calls as they are"
            return f"transformer CUDA graphs: {total} calls as they are (new shapes; the next edit with them replays)"
        recorded = " (recorded in this edit)" if self.calls.get("recorded") else ""
        return f"transformer CUDA graphs: {replayed} of {total} calls replayed{recorded}"

    def _count(self, what: str) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1


def _predict(pipe, branch: str, model_input, timestep, prompt: PromptEmbeds, img_shapes) -> torch.Tensor:
    with pipe.transformer.cache_context(branch):
        return _transformer(pipe.transformer, model_input, timestep, prompt.embeds, prompt.mask, img_shapes)


def _transformer(transformer, model_input, timestep, embeds, mask, img_shapes) -> torch.Tensor:
    """The transformer's velocity for one call, as the pipeline calls it."""
    return transformer(
        hidden_states=model_input,
        timestep=timestep,
        guidance=None,
        encoder_hidden_states_mask=mask,
        encoder_hidden_states=embeds,
        img_shapes=img_shapes,
        attention_kwargs={},
        return_dict=False,
    )[0]


def decode(pipe, latents: torch.Tensor, width: int, height: int, tile: Tiling | None = None) -> Image.Image:
    """Unpack, un-normalize and VAE-decode the latents to a PIL image (in Hann-blended tiles with `tile`).

    In fp16 the VAE can overflow; then it is moved to fp32 for good and the decode repeated.
    """
    vae = pipe.vae
    dtype = vae.dtype  # diffusers looks through all ~260 modules for hooks each time: asked once (0.7 ms)
    unpacked = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    image = _vae_decode(vae, unpacked.to(dtype), tile)
    if dtype == torch.float16 and not torch.isfinite(image).all():
        log.warning("VAE decode overflowed in fp16; switching the VAE to fp32")
        vae.to(torch.float32)
        image = _vae_decode(vae, unpacked.to(torch.float32), tile)
    return to_pil(pipe.image_processor, image)


def to_pil(processor, image: torch.Tensor) -> Image.Image:
    """The first image of a decoded batch (B, 3, H, W in [-1, 1]) as a PIL image, equal bit for bit to
    diffusers' `processor.postprocess(image, output_type="pil")[0]`.

    diffusers copies the whole float image to the host and scales, rounds and casts it there; here
    those steps run on the tensor's device (the same float32 operations, each rounded the same way)
    and only the 8-bit pixels are copied. A processor that does not normalize goes to diffusers.

    Example:
        >>> from diffusers.image_processor import VaeImageProcessor
        >>> to_pil(VaeImageProcessor(), torch.zeros(1, 3, 2, 2)).getpixel((0, 0))
        (128, 128, 128)
    """
    if not processor.config.do_normalize or image.shape[1] != 3:
        return processor.postprocess(image, output_type="pil")[0]
    unit = processor.denormalize(image[:1])  # in the image's dtype, as diffusers does it
    pixels = (unit.float() * 255).round().to(torch.uint8)
    return Image.fromarray(pixels[0].permute(1, 2, 0).contiguous().cpu().numpy())


def _vae_decode(vae, latents: torch.Tensor, tile: Tiling | None = None) -> torch.Tensor:
    """Un-normalize `latents` (in the VAE's dtype) and decode them: (B, 3, H, W) in [-1, 1]."""
    mean, std = _latent_stats(vae, latents)
    # Written as the pipeline writes it (divide by 1/std), so results match it bit for bit.
    latents = latents / (1.0 / std) + mean
    if tile is not None:
        return tiled_decode(vae, latents, tile.size, tile.overlap)[:, :, 0]
    return vae.decode(latents, return_dict=False)[0][:, :, 0]


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel latent mean and std, shaped and placed like `like` (B, C, T, H, W).

    Made once per device and dtype and kept on the VAE: building them from the config is a copy from
    the host, which on a GPU waits for all queued work (the encode or the denoise loop before it).
    The same values as diffusers' per-call tensors.
    """
    key = (str(like.device), like.dtype)
    stats = vars(vae).setdefault("_qie_latent_stats", {})
    if key not in stats:
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
        stats[key] = (mean, std)
    return stats[key]


def _encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """diffusers' `_encode_vae_image` for one image (the distribution's mode, normalized), with the latent
    statistics kept on the device: the host returns while the GPU encodes (the text encoder's image
    preparation runs meanwhile; `Editor.encode`)."""
    latents = retrieve_latents(vae.encode(pixels), sample_mode="argmax")
    mean, std = _latent_stats(vae, latents)
    return (latents - mean) / std


def _tiled_encode_latents(vae, pixels: torch.Tensor, tile: Tiling) -> torch.Tensor:
    """Normalized latents of `pixels` from a tiled encode (the distribution's mode, as "argmax" takes)."""
    latents = tiled_encode(vae, pixels, tile.size, tile.overlap)[:, : vae.config.z_dim]
    mean, std = _latent_stats(vae, latents)
    return (latents - mean) / std
