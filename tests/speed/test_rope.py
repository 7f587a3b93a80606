"""RoPE in real arithmetic: equal to diffusers' complex form, and compiled blocks keep no complex fallback."""

import importlib

import pytest
import torch
from conftest import small_request
from oracle import assert_installed_option_within
from torch._inductor.utils import run_and_get_code

from qie.speed import rope
from qie.speed.compile import compile_blocks, uncompile_blocks

qwen = importlib.import_module(rope.QWEN_MODULE)


@pytest.fixture()
def transformer(tiny_editor):
    """A fresh transformer of the tiny config, with the shared one's weights."""
    from diffusers import QwenImageTransformer2DModel

    fresh = QwenImageTransformer2DModel.from_config(tiny_editor.pipe.transformer.config)
    fresh.load_state_dict(tiny_editor.pipe.transformer.state_dict())
    yield fresh
    rope.uninstall(fresh)


def complex_freqs(tokens: int, pairs: int) -> torch.Tensor:
    torch.manual_seed(0)
    angles = torch.randn(tokens, pairs) * 10
    return torch.polar(torch.ones_like(angles), angles)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotate_equals_diffusers_complex_rotation(dtype):
    x = torch.randn(2, 37, 3, 16, dtype=dtype)
    freqs = complex_freqs(37, 8)
    want = qwen.apply_rotary_emb_qwen(x, freqs, use_real=False)
    got = rope.rotate(x, torch.view_as_real(freqs))
    assert got.dtype == dtype and torch.equal(got, want)


def test_the_dispatcher_hands_complex_and_cos_sin_inputs_to_diffusers(transformer):
    assert rope.install(transformer)
    apply = qwen.apply_rotary_emb_qwen
    assert apply.qie_original is not None
    x = torch.randn(1, 5, 2, 8)
    freqs = complex_freqs(5, 4)
    assert torch.equal(apply(x, freqs, use_real=False), apply.qie_original(x, freqs, use_real=False))
    heads_first, cos, sin = x.transpose(1, 2), torch.randn(5, 8), torch.randn(5, 8)  # its use_real layout
    assert torch.equal(apply(heads_first, (cos, sin)), apply.qie_original(heads_first, (cos, sin)))
    assert rope.install(transformer) and qwen.apply_rotary_emb_qwen is apply  # once only


def test_install_turns_the_rotary_output_real_for_that_transformer_only(transformer, tiny_editor):
    shapes, kwargs = [[(1, 4, 4)]], {"max_txt_seq_len": 6, "device": torch.device("cpu")}
    before = transformer.pos_embed(shapes, **kwargs)
    assert rope.install(transformer) and rope.installed(transformer)
    after = transformer.pos_embed(shapes, **kwargs)
    for b, a in zip(before, after, strict=True):
        assert b.is_complex() and not a.is_complex()
        assert torch.equal(torch.view_as_real(b), a)
    assert tiny_editor.pipe.transformer.pos_embed(shapes, **kwargs)[0].is_complex()  # the shared one: untouched
    rope.uninstall(transformer)
    assert not rope.installed(transformer) and transformer.pos_embed(shapes, **kwargs)[0].is_complex()


def block_inputs(transformer, image_tokens: int = 16, text_tokens: int = 6):
    dim = transformer.inner_dim
    torch.manual_seed(1)
    hidden = torch.randn(1, image_tokens, dim)
    text = torch.randn(1, text_tokens, dim)
    temb = torch.randn(1, dim)
    freqs = transformer.pos_embed([[(1, 4, 4)]], max_txt_seq_len=text_tokens, device=torch.device("cpu"))
    return hidden, text, None, temb, freqs


def test_a_compiled_block_keeps_no_complex_kernel_with_real_rope(transformer):
    block = transformer.transformer_blocks[0]
    with torch.no_grad():
        _, plain = run_and_get_code(torch.compile(block, fullgraph=True), *block_inputs(transformer))
        assert "view_as_complex" in "\n".join(plain)  # diffusers' complex RoPE: an eager fallback in the graph
        torch._dynamo.reset()
        rope.install(transformer)
        want = block(*block_inputs(transformer))
        got, real = run_and_get_code(torch.compile(block, fullgraph=True), *block_inputs(transformer))
    torch._dynamo.reset()
    assert "view_as_complex" not in "\n".join(real)
    for w, g in zip(want, got, strict=True):
        assert torch.allclose(w, g, atol=1e-5, rtol=1e-4)


def test_compile_blocks_installs_it_and_uncompile_removes_it(transformer, tmp_path):
    assert compile_blocks(transformer, cache_dir=tmp_path)
    assert rope.installed(transformer)
    uncompile_blocks(transformer)
    assert not rope.installed(transformer)


def test_an_edit_with_real_rope_equals_the_complex_one(tiny_editor, photo):
    request = small_request(photo, seed=5, steps=2)
    transformer = tiny_editor.pipe.transformer
    assert_installed_option_within("rope-real", tiny_editor, request, transformer, rope.install, rope.uninstall)
