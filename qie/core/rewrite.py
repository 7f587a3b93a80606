"""Prompt rewriting: the pipeline's own text encoder (Qwen2.5-VL-7B-Instruct) turns a short edit
instruction into a precise one, looking at the input images.

The text encoder is a full vision-language chat model (LM head included); the edit pipeline only
reads its hidden states (it runs the base model, `qie.core.stages.hidden_state_model`, and never
the LM head). Here it generates, greedily and with a bound on new tokens, under a system prompt
that asks for one explicit instruction: what to change, where, and what to keep. Memory plans
need nothing special: on streamed plans the layers and the LM head
(`qie.memory.placement.onload_per_call`) come to the GPU for each generated token's forward, and
the token embedding looks the ids up on the host (`qie.memory.placement.lookup_on_host`).

Example:
    >>> editor.rewrite_prompt(["shoe.jpg"], "white background")                  # doctest: +SKIP
    'Replace the background behind the shoe with a clean, pure white studio backdrop; keep ...'
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Sequence

import torch
from PIL import Image

from qie.core import stages
from qie.errors import InvalidRequestError

log = logging.getLogger(__name__)

LANGUAGES = ("en", "zh")
DEFAULT_MAX_NEW_TOKENS = 200
MAX_NEW_TOKENS = 512
_LANGUAGE_RULE = {
    "en": "Write the instruction in English.",
    "zh": "Write the instruction in Simplified Chinese (简体中文).",
}
SYSTEM_PROMPT = """You rewrite image-editing instructions for an instruction-based image editor.
You see the input image(s), numbered Picture 1, Picture 2, ... in order, and a short instruction.
Return one precise instruction that the editor can follow literally:
- Name the edit type (add, remove, replace, recolor, restyle, change text, change pose, ...) and its target,
  located by what it is and where it is in the picture (e.g. "the red mug on the left").
- Give the concrete result: colours, materials, sizes, positions, lighting, style, and any text to write,
  in double quotes, exactly as it must appear.
- Say what must stay unchanged: identity, pose, framing, background or other objects, as the edit allows.
- With several pictures, say which picture provides what (e.g. "the jacket from Picture 2").
- Keep the user's intent; do not add unrelated changes. One paragraph, at most 80 words.
{language}
Answer with the instruction only: no preamble, no quotes around it, no explanation."""


def check_language(language: str) -> str:
    """`language` if it is one of `LANGUAGES`, else `InvalidRequestError`."""
    if language not in LANGUAGES:
        raise InvalidRequestError("language", language, f"use one of {LANGUAGES}")
    return language


def check_max_new_tokens(value: int) -> int:
    """`value` if it is a whole number from 1 to `MAX_NEW_TOKENS`, else `InvalidRequestError`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_NEW_TOKENS:
        raise InvalidRequestError("max_new_tokens", value, f"give a whole number from 1 to {MAX_NEW_TOKENS}")
    return value


def chat_text(prompt: str, n_images: int, language: str) -> str:
    """The Qwen2.5-VL chat turn (system, user with image placeholders, open assistant turn)."""
    system = SYSTEM_PROMPT.format(language=_LANGUAGE_RULE[language])
    pictures = "".join(stages.IMAGE_PROMPT.format(i + 1) for i in range(n_images))
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{pictures}{prompt}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def generate_rewrite(
    pipe,
    images: Sequence[Image.Image],
    prompt: str,
    *,
    language: str,
    max_new_tokens: int,
    device: torch.device,
) -> str:
    """Greedy generation with `pipe.text_encoder` from the chat turn; the caller holds the GPU lock."""
    inputs = pipe.processor(
        text=[chat_text(prompt, len(images), language)],
        images=stages.prompt_images(pipe, images) or None,
        padding=True,
        return_tensors="pt",
    ).to(device)
    tokenizer = pipe.tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.inference_mode():
        out = pipe.text_encoder.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=end,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end,
        )
    new = out[0, inputs["input_ids"].shape[1] :]
    return clean_text(tokenizer.decode(new, skip_special_tokens=True))


def clean_text(text: str) -> str:
    """Generated text as one prompt: control characters and undecodable bytes dropped, quotes trimmed."""
    kept = "".join(c for c in text if c in "\n\t" or (unicodedata.category(c)[0] != "C" and c != "\ufffd"))
    return " ".join(kept.split()).strip("\"'“”「」 ")
