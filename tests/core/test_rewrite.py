"""`Editor.rewrite_prompt` on the tiny model: gibberish text, but the real generation path."""

import logging

import pytest
import torch

from qie import BusyError, Editor, InvalidRequestError
from qie.core.rewrite import SYSTEM_PROMPT, chat_text, clean_text


@pytest.fixture()
def generated(tiny_editor):
    """The new-token counts of each `generate` call on the tiny editor's text encoder."""
    counts = []
    te = tiny_editor.pipe.text_encoder
    original = te.generate

    def spy(**kwargs):
        out = original(**kwargs)
        counts.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    te.generate = spy
    yield counts
    del te.generate


def test_rewrite_generates_a_bounded_deterministic_prompt(tiny_editor, photo, generated):
    first = tiny_editor.rewrite_prompt([photo], "white background", max_new_tokens=12)
    again = tiny_editor.rewrite_prompt(photo, "white background", max_new_tokens=12)
    assert isinstance(first, str) and first == again  # greedy: the same inputs give the same text
    assert generated and all(1 <= n <= 12 for n in generated)
    assert not tiny_editor.lock.locked()


def test_chat_turn_holds_system_prompt_images_and_prompt():
    text = chat_text("make it blue", 2, "zh")
    assert text.startswith("<|im_start|>system\n" + SYSTEM_PROMPT.split("\n")[0])
    assert "Simplified Chinese" in text and text.count("<|image_pad|>") == 2
    assert text.endswith(
        "Picture 2: <|vision_start|><|image_pad|><|vision_end|>make it blue<|im_end|>\n<|im_start|>assistant\n"
    )
    assert clean_text('"  Replace\x03 the\ufffd sky\n with  dusk. "') == "Replace the sky with dusk."


def test_rewrite_checks_its_arguments_and_holds_the_lock(tiny_editor, photo):
    with pytest.raises(InvalidRequestError, match="^language='fr'"):
        tiny_editor.rewrite_prompt([photo], "x", language="fr")
    with pytest.raises(InvalidRequestError, match="^max_new_tokens=0"):
        tiny_editor.rewrite_prompt([photo], "x", max_new_tokens=0)
    with pytest.raises(InvalidRequestError, match="^prompt="):
        tiny_editor.rewrite_prompt([photo], "   ")
    with tiny_editor.lock, pytest.raises(BusyError, match="busy"):
        tiny_editor.rewrite_prompt([photo], "x", timeout=0.01)


def test_unusable_text_keeps_the_prompt(tiny_editor, photo, monkeypatch, caplog):
    monkeypatch.setattr("qie.core.editor.generate_rewrite", lambda *a, **kw: "")
    with caplog.at_level(logging.WARNING):
        assert tiny_editor.rewrite_prompt([photo], "white background") == "white background"
    assert "no usable instruction" in caplog.text


@pytest.mark.slow
def test_rewrite_through_a_streamed_text_encoder(tiny_editor, photo):
    """Layers streamed by group offloading and the embedding and LM head onloaded per call (here onto the CPU)."""
    from qie.memory.placement import stream_text_encoder

    editor = Editor.load("tiny")
    stream_text_encoder(editor.pipe, torch.device("cpu"))
    calls = []
    editor.pipe.text_encoder.lm_head.register_forward_pre_hook(lambda *_: calls.append(1))
    streamed = editor.rewrite_prompt([photo], "white background", max_new_tokens=6)
    assert streamed == tiny_editor.rewrite_prompt([photo], "white background", max_new_tokens=6)
    assert calls  # one LM-head call per generated token
