"""Attention backend choice from given facts, per-request quantized attention and its fallback."""

import logging

import pytest
from conftest import small_request

from qie import InvalidRequestError
from qie.speed.attention import AttentionFacts, BackendChoice, choose_backend, quantized_attention, quantized_backend

KNOWN = {"native", "_native_cudnn", "_native_flash", "flash", "_flash_3", "sage", "xformers", "flash_hub"}


def facts(**kw) -> AttentionFacts:
    base = dict(
        device="cuda",
        capability=(9, 0),
        dtype="bf16",
        cudnn=True,
        flash_attn_3=False,
        flash_attn=False,
        sageattention=False,
    )
    return AttentionFacts(**{**base, **kw})


def choose(f: AttentionFacts, override: str | None = None):
    return choose_backend(f, override, known=lambda: KNOWN)


@pytest.mark.parametrize(
    ("kw", "name", "n_fallbacks"),
    [
        ({"flash_attn_3": True, "flash_attn": True}, "_flash_3", 0),
        ({}, "native", 1),  # H100 without flash-attn 3: PyTorch SDPA (measured faster than forced cuDNN)
        ({"flash_attn": True}, "native", 1),  # flash-attn 2 is not tried on Hopper
        ({"capability": (8, 0), "flash_attn": True}, "flash", 0),  # A100: flash-attn 2 first
        ({"capability": (8, 0)}, "native", 1),
        ({"capability": (7, 5), "flash_attn": True}, "native", 1),  # T4: flash-attn 2 needs Ampere
        ({"capability": (10, 0), "flash_attn_3": True}, "native", 1),  # flash-attn 3 is Hopper-only
        ({"dtype": "fp32", "flash_attn_3": True}, "native", 1),
    ],
)
def test_auto_choice_follows_the_facts(kw, name, n_fallbacks):
    choice = choose(facts(**kw))
    assert choice.name == name
    assert len(choice.fallbacks) == n_fallbacks


def test_cpu_is_native_without_warnings_and_overrides_need_a_gpu():
    cpu = facts(device="cpu", capability=None, cudnn=False)
    assert choose(cpu) == BackendChoice("native")
    assert choose(cpu, "_native_cudnn") == BackendChoice("native", ("_native_cudnn: needs a CUDA GPU",))


def test_fallback_reasons_say_what_is_missing():
    choice = choose(facts())
    assert choice.describe() == "flash-attn 3 not installed → native"


def test_override_is_kept_when_it_can_run_and_replaced_when_not():
    assert choose(facts(), "_native_flash").name == "_native_flash"
    fallback = choose(facts(), "flash")
    assert fallback.name == "native"
    assert fallback.fallbacks[0] == "flash: flash-attn not installed"
    with pytest.raises(InvalidRequestError, match="attention='nope'"):
        choose(facts(), "nope")


def test_quantized_backend_per_gpu():
    assert quantized_backend(facts(sageattention=True), "fp8")[0] == "_sage_qk_int8_pv_fp8_cuda_sm90"
    assert quantized_backend(facts(sageattention=True, capability=(8, 9)), "fp8")[0] == "_sage_qk_int8_pv_fp8_cuda"
    assert quantized_backend(facts(sageattention=True, capability=(8, 0)), "int8")[0] == "_sage_qk_int8_pv_fp16_cuda"
    assert quantized_backend(facts(sageattention=True, capability=(8, 0)), "fp8")[0] is None
    backend, reason = quantized_backend(facts(), "int8")
    assert backend is None and "sageattention" in reason


class Recorder:
    def __init__(self):
        self.backends = []

    def set_attention_backend(self, name):
        self.backends.append(name)


def test_quantized_attention_is_restored_after_an_error():
    transformer = Recorder()
    with (
        pytest.raises(RuntimeError),
        quantized_attention(transformer, "fp8", "_native_cudnn", facts(sageattention=True)) as note,
    ):
        assert "_sage_qk_int8_pv_fp8_cuda_sm90" in note
        raise RuntimeError("boom")
    assert transformer.backends == ["_sage_qk_int8_pv_fp8_cuda_sm90", "_native_cudnn"]


def test_tiny_pipeline_runs_after_setting_native(tiny_editor, photo):
    tiny_editor.pipe.transformer.set_attention_backend("native")
    result = tiny_editor.edit(small_request(photo, steps=2))
    assert max(result.image.size) == 128
    assert tiny_editor.speed.attention_backend == "native"  # CPU: auto chose native


def test_attention_quant_falls_back_on_cpu_and_says_so(tiny_editor, photo, caplog):
    with caplog.at_level(logging.WARNING, logger="qie.speed.attention"):
        result = tiny_editor.edit(small_request(photo, steps=2, attention_quant="int8"))
    assert any("attention_quant=int8 unavailable" in n for n in result.notes)
    assert "needs a CUDA GPU" in caplog.text
    plain = tiny_editor.edit(small_request(photo, steps=2))
    assert list(result.image.getdata()) == list(plain.image.getdata())


@pytest.mark.gpu
def test_auto_choice_runs_on_the_gpu(photo):
    """On a CUDA GPU the automatic choice is a GPU kernel and the tiny model runs with it."""
    import torch

    from qie import Editor

    editor = Editor.load("tiny", device="cuda", dtype=torch.bfloat16)
    assert editor.speed.attention_backend in ("fa3-fwd", "_flash_3", "flash", "native")  # fa3-fwd where installed
    assert max(editor.edit(small_request(photo, steps=2)).image.size) == 128
