"""The transformers 5.x prompt-encoding bug (diffusers #14194) and qie's fix for it.

Stock diffusers calls the Qwen2.5-VL text encoder without the processor's `mm_token_type_ids`, so
image tokens get sequential positions instead of their 3-D M-RoPE positions. qie forwards it.
"""

import pytest
import torch
from PIL import Image

from qie.core import stages

PROMPT = "replace the background with pure white"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tiny_editor):
    pipe = tiny_editor.pipe
    images = stages.prompt_images(pipe, [Image.new("RGB", (320, 240), (200, 50, 20))])
    return pipe, images


def encoder_with_full_processor_output(pipe, images):
    """What the text encoder produces when given everything the processor returns."""
    text = pipe.prompt_template_encode.format("Picture 1: <|vision_start|><|image_pad|><|vision_end|>" + PROMPT)
    inputs = pipe.processor(text=[text], images=images, padding=True, return_tensors="pt")
    assert "mm_token_type_ids" in inputs, "processor no longer returns mm_token_type_ids: revisit the fix"
    with torch.inference_mode():
        hidden = pipe.text_encoder(**inputs, output_hidden_states=True).hidden_states[-1]
    return hidden[0][inputs["attention_mask"][0].bool()][pipe.prompt_template_encode_start_idx :]


def test_fixed_encoding_equals_the_encoders_own_positions(setup):
    pipe, images = setup
    with torch.inference_mode():
        fixed = stages.encode_prompt(pipe, PROMPT, images, device=torch.device("cpu")).embeds[0]
    torch.testing.assert_close(fixed, encoder_with_full_processor_output(pipe, images), rtol=0, atol=0)


def test_without_the_fix_embeddings_differ(setup):
    pipe, images = setup
    with torch.inference_mode():
        broken = stages.encode_prompt(pipe, PROMPT, images, device=torch.device("cpu"), forward_mm_token_type_ids=False)
    expected = encoder_with_full_processor_output(pipe, images)
    assert (broken.embeds[0] - expected).abs().max() > 1e-3


def test_upstream_pipeline_still_has_the_bug(setup):
    """Fails when diffusers fixes #14194: then drop `forward_mm_token_type_ids` from qie.core.stages."""
    pipe, images = setup
    with torch.inference_mode():
        stock, _ = pipe.encode_prompt(prompt=PROMPT, image=images, device=torch.device("cpu"))
        unfixed = stages.encode_prompt(
            pipe, PROMPT, images, device=torch.device("cpu"), forward_mm_token_type_ids=False
        )
    assert torch.equal(stock, unfixed.embeds), (
        "stock diffusers' prompt encoding changed: if it now forwards mm_token_type_ids, remove qie's workaround"
    )


def test_older_encoders_without_the_argument_still_work(setup, monkeypatch):
    pipe, images = setup
    monkeypatch.setattr(stages, "_accepts", lambda module, name: False)
    with torch.inference_mode():
        out = stages.encode_prompt(pipe, PROMPT, images, device=torch.device("cpu"))
        unfixed = stages.encode_prompt(
            pipe, PROMPT, images, device=torch.device("cpu"), forward_mm_token_type_ids=False
        )
    torch.testing.assert_close(out.embeds, unfixed.embeds, rtol=0, atol=0)


def test_overlong_prompt_is_refused_in_tokens(setup):
    from qie import InvalidRequestError

    pipe, images = setup
    with pytest.raises(InvalidRequestError, match="at most 1024 tokens"), torch.inference_mode():
        stages.encode_prompt(pipe, "水" * 1500, images, device=torch.device("cpu"))


@pytest.fixture()
def lm_head_calls(tiny_editor):
    """How often the tiny editor's LM head runs (a forward hook, removed afterwards)."""
    calls = []
    handle = tiny_editor.pipe.text_encoder.lm_head.register_forward_hook(lambda *_: calls.append(1))
    yield calls
    handle.remove()


def test_encoding_skips_the_lm_head_and_rewriting_uses_it(setup, tiny_editor, photo, lm_head_calls):
    """Edits read hidden states only: the base model runs, the LM head (1 GiB, streamed per call) does not."""
    pipe, images = setup
    with torch.inference_mode():
        stages.encode_prompt(pipe, PROMPT, images, device=CPU)
    assert lm_head_calls == []
    tiny_editor.rewrite_prompt([photo], "white background", max_new_tokens=2)
    assert lm_head_calls  # generation needs the logits


def test_hooks_on_the_text_encoder_still_run_during_encoding(setup):
    """accelerate's offload hook (model-offload plan) and forward pre-hooks (`qie.core.faults`) sit on the
    full model's forward: with either, `encode_prompt` runs the full model, with the same result."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    pipe, images = setup
    te = pipe.text_encoder
    with torch.inference_mode():
        plain = stages.encode_prompt(pipe, PROMPT, images, device=CPU).embeds
    calls = []

    class Counting(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append("accelerate")
            return args, kwargs

    add_hook_to_module(te, Counting())
    try:
        with torch.inference_mode():
            offloaded = stages.encode_prompt(pipe, PROMPT, images, device=CPU).embeds
    finally:
        remove_hook_from_module(te)
    handle = te.register_forward_pre_hook(lambda *_: calls.append("pre-hook"))
    try:
        with torch.inference_mode():
            hooked = stages.encode_prompt(pipe, PROMPT, images, device=CPU).embeds
    finally:
        handle.remove()
    assert calls == ["accelerate", "pre-hook"]
    assert stages.hidden_state_model(te) is te.model  # hooks gone: the base model again
    torch.testing.assert_close(offloaded, plain, rtol=0, atol=0)
    torch.testing.assert_close(hooked, plain, rtol=0, atol=0)
