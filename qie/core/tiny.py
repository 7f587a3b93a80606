"""A tiny, random, structurally real `QwenImageEditPlusPipeline` built offline.

Every component is the real class with a small config: the MMDiT transformer, the Qwen-Image VAE,
a Qwen2.5-VL text encoder (with its vision tower), a byte-level BPE tokenizer trained here on the
pipeline's own prompt template (so the 64 template tokens the pipeline drops are exactly the
system prompt, as with the real tokenizer) and a Qwen2-VL processor. Nothing is downloaded.

Example:
    >>> from qie.core.tiny import build_tiny_pipeline
    >>> pipe = build_tiny_pipeline(seed=0, variant="2511")  # doctest: +SKIP
    >>> pipe.save_pretrained("tiny-qie")     # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPlusPipeline,
    QwenImageTransformer2DModel,
)
from transformers import (
    ProcessorMixin,  # noqa: F401  (diffusers looks up base-class names in this module when reloading)
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from qie.core.registry import check_variant

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
    "objects, background), then explain how the user's text instruction should alter or modify the "
    "image. Generate a new image that meets the user's requirements while maintaining consistency with "
    "the original input where appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)

# The Qwen2.5-VL special tokens, in the real tokenizer's order.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Text the BPE is trained on: the template (so every template word is one token, as in Qwen's
# vocabulary) and typical edit instructions.
_TRAINING_TEXT = [
    PROMPT_TEMPLATE.format("Picture 1: Picture 2: Picture 3: "),
    "Replace the background with pure white. Remove the watermark and the logo. "
    "Add a red price tag that says 'Sale $19.9' in the bottom right corner. "
    "Make the sky blue, change the color of the shirt, keep the product unchanged.",
]

TEXT_HIDDEN = 32
TINY_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": TEXT_HIDDEN,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 4096,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
}
TINY_VISION_CONFIG: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": TEXT_HIDDEN,
    "fullatt_block_indexes": [1],
    "window_size": 112,
}
TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": TEXT_HIDDEN,
    "axes_dims_rope": (4, 6, 6),
}
TINY_VAE_CONFIG: dict[str, Any] = {"base_dim": 8, "z_dim": 16}
SCHEDULER_CONFIG: dict[str, Any] = {
    # The real model's scheduler settings (Qwen/Qwen-Image-Edit-2509 scheduler_config.json).
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


class TinyQwen2VLProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without a video processor.

    transformers 5.x builds a torchvision-backed video processor by default; the tiny pipeline has
    no use for video, and this keeps it loadable where torchvision is missing.
    """

    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def build_tokenizer() -> Qwen2Tokenizer:
    """Train a small byte-level BPE on the prompt template and wrap it as a `Qwen2Tokenizer`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_TRAINING_TEXT * 3, trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=state["vocab"], merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.model_max_length = 32768
    return tokenizer


def text_encoder_config(tokenizer: Qwen2Tokenizer, text: dict, vision: dict) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config whose special-token ids match `tokenizer` (vocab at least the tokenizer's)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        text_config={
            **text,
            "vocab_size": max(len(tokenizer), text.get("vocab_size", 0)),
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def build_tiny_pipeline(seed: int = 0, variant: str = "2509") -> QwenImageEditPlusPipeline:
    """Build the tiny pipeline in fp32 on CPU, with weights drawn from `seed` (deterministic).

    `variant` "2511" gives the Edit-2511 transformer flavour (`zero_cond_t=True`); the weights are
    the same draws as the 2509 one's (the flag adds no parameters).
    """
    check_variant(variant)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    processor = TinyQwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer)
    config = text_encoder_config(tokenizer, TINY_TEXT_CONFIG, TINY_VISION_CONFIG)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    transformer = QwenImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG, zero_cond_t=variant == "2511").eval()
    vae = AutoencoderKLQwenImage(**TINY_VAE_CONFIG).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    return QwenImageEditPlusPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=processor,
        transformer=transformer,
    )


def save_tiny_pipeline(path: str | Path, seed: int = 0, variant: str = "2509") -> Path:
    """Build the tiny pipeline and save it where `from_pretrained(path)` can load it."""
    path = Path(path)
    build_tiny_pipeline(seed, variant).save_pretrained(path)
    return path
