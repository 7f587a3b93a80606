"""The fused q/k prologue (RMSNorm, RoPE, text+image join): diffusers' arithmetic, one op, same attention."""

import copy
import importlib

import pytest
import torch
from conftest import block_call, small_request
from oracle import assert_matches_reference

from qie.speed import qk_prologue, rope

qwen = importlib.import_module(rope.QWEN_MODULE)


def norms(dim: int = 16, dtype=torch.bfloat16):
    from diffusers.models.normalization import RMSNorm

    torch.manual_seed(3)
    made = [RMSNorm(dim, eps=1e-6).to(dtype) for _ in range(2)]
    for norm in made:
        norm.weight.data.uniform_(0.5, 1.5)
    return made


def freqs(tokens: int, pairs: int) -> torch.Tensor:
    angles = torch.rand(tokens, pairs) * 50
    return torch.view_as_real(torch.polar(torch.ones_like(angles), angles))


def test_the_op_is_diffusers_norm_rope_and_concatenation():
    txt_norm, img_norm = norms()
    txt, img = torch.randn(2, 5, 3, 16).bfloat16(), torch.randn(2, 12, 3, 16).bfloat16() * 4
    txt_f, img_f = freqs(5, 8), freqs(12, 8)
    want = torch.cat(
        [
            qwen.apply_rotary_emb_qwen(txt_norm(txt), torch.view_as_complex(txt_f), use_real=False),
            qwen.apply_rotary_emb_qwen(img_norm(img), torch.view_as_complex(img_f), use_real=False),
        ],
        dim=1,
    )
    got = qk_prologue.norm_rope_join(txt, img, txt_norm, img_norm, txt_f, img_f)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.fixture()
def transformer(tiny_editor):
    """A copy of the tiny transformer (installing on the shared one would leak into other tests)."""
    fresh = copy.deepcopy(tiny_editor.pipe.transformer)
    yield fresh
    qk_prologue.uninstall(fresh)
    rope.uninstall(fresh)


def attention_call(transformer, batch: int = 2, image_tokens: int = 16, text_tokens: int = 6):
    attn = transformer.transformer_blocks[0].attn
    dim = transformer.inner_dim
    torch.manual_seed(1)
    hidden, text = torch.randn(batch, image_tokens, dim), torch.randn(batch, text_tokens, dim)
    mask = torch.ones(batch, text_tokens, dtype=torch.bool)
    mask[-1, 4:] = False  # a padded prompt, as the negative branch of batched CFG
    rotary = transformer.pos_embed([[(1, 4, 4)]], max_txt_seq_len=text_tokens, device=torch.device("cpu"))
    return attn, {"hidden_states": hidden, "encoder_hidden_states": text, "encoder_hidden_states_mask": mask}, rotary


def test_the_fused_processor_equals_diffusers_with_and_without_a_prompt_mask(transformer):
    attn, kwargs, rotary = attention_call(transformer)
    with torch.no_grad():
        want = attn(**kwargs, image_rotary_emb=rotary)
        want_unmasked = attn(**{**kwargs, "encoder_hidden_states_mask": None}, image_rotary_emb=rotary)
        assert qk_prologue.install(transformer) == len(transformer.transformer_blocks)
        calls = []
        op = qk_prologue._join_op
        spy = lambda *a: calls.append(1) or op(*a)  # noqa: E731
        real = tuple(torch.view_as_real(f) for f in rotary)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(qk_prologue, "_join_op", spy)
            got = attn(**kwargs, image_rotary_emb=real)
            got_unmasked = attn(**{**kwargs, "encoder_hidden_states_mask": None}, image_rotary_emb=real)
            assert len(calls) == 4  # queries and keys, two calls
            fallback = attn(**kwargs, image_rotary_emb=rotary)  # complex frequencies: diffusers' own code
            assert len(calls) == 4
    for w, g, u, gu, f in zip(want, got, want_unmasked, got_unmasked, fallback, strict=True):
        assert torch.equal(w, g) and torch.equal(u, gu) and torch.equal(w, f)


def test_the_fp8_op_is_the_bf16_op_cast_under_the_weight_bound():
    from qie.memory.fp8_matmul import to_fp8

    txt_norm, img_norm = norms()
    img_norm.weight.data[5] = 3.0  # the largest weight sets the bound
    txt, img = torch.randn(2, 5, 3, 16).bfloat16() * 1000, torch.randn(2, 12, 3, 16).bfloat16() * 1e-3
    txt_f, img_f = freqs(5, 8), freqs(12, 8)
    values, scales = qk_prologue.norm_rope_join_fp8(txt, img, txt_norm, img_norm, txt_f, img_f)
    bf16 = qk_prologue.norm_rope_join(txt, img, txt_norm, img_norm, txt_f, img_f)
    bound = 16**0.5 * 3.0 * qk_prologue.BOUND_MARGIN / 448
    assert values.dtype == torch.float8_e4m3fn and scales.shape == (2, 3)
    assert torch.allclose(scales, torch.full((2, 3), bound))
    assert torch.equal(values.view(torch.uint8), to_fp8(bf16, scales[:1, :1, None, None]).view(torch.uint8))
    assert values.float().abs().max() < 448  # normalized values cannot reach the bound: nothing saturates
    # fp8 keeps its relative precision at these magnitudes (e4m3: 3 mantissa bits, half a step of error)
    back = values.float() * bound
    assert ((back - bf16.float()).abs() <= bf16.float().abs() * 2**-4 + bound * 2**-9).all()


def test_fp8_attention_takes_the_prologues_fp8_queries_and_keys(transformer):
    from qie.speed import fa3

    attn, kwargs, rotary = attention_call(transformer)  # batch 2, one prompt padded: kept keys reordered
    real = tuple(torch.view_as_real(f) for f in rotary)
    ran = []

    def spy(name, kernel):
        return lambda *a: ran.append(name) or kernel(*a)

    with torch.no_grad():
        want = attn(**kwargs, image_rotary_emb=rotary)
        qk_prologue.install(transformer)
        assert fa3.install(
            torch.device("cpu"),
            kernel=fa3.reference_kernel,
            fp8_kernel=spy("bf16 in", fa3.reference_fp8_kernel),
            fp8_forward=spy("fp8 in", fa3.reference_fp8_forward),
        )
        try:
            bf16 = attn(**kwargs, image_rotary_emb=real)
            assert ran == []
            with fa3.fp8_attention():
                fused = attn(**kwargs, image_rotary_emb=real)
            assert ran == ["fp8 in"]  # the prologue's fp8 output went straight to the fp8 forward
            qk_prologue.uninstall(transformer)
            with fa3.fp8_attention():
                unfused = attn(**kwargs, image_rotary_emb=rotary)  # diffusers' processor: quantizes all three
            assert ran == ["fp8 in", "bf16 in"]
        finally:
            fa3.uninstall()
    for w, b, f, u in zip(want, bf16, fused, unfused, strict=True):
        assert torch.allclose(w, b, atol=1e-5, rtol=1e-4)
        assert not torch.equal(f, w)  # fp8 changed the numbers ...
        for got in (f, u):  # ... by fp8's rounding, whichever way the queries and keys were scaled
            assert ((got - w).norm() / w.norm()).item() < 0.08


def test_install_keeps_the_attention_backend_and_uninstall_restores(transformer):
    original = transformer.transformer_blocks[0].attn.processor
    original._attention_backend = "native"
    assert qk_prologue.install(transformer) > 0 and qk_prologue.installed(transformer)
    assert qk_prologue.install(transformer) == 0  # once only
    fused = transformer.transformer_blocks[0].attn.processor
    assert fused._attention_backend == "native" and fused is not original
    qk_prologue.uninstall(transformer)
    assert transformer.transformer_blocks[0].attn.processor is original and not qk_prologue.installed(transformer)


def test_a_compiled_block_calls_the_op_and_matches_eager(transformer, monkeypatch):
    rope.install(transformer)
    qk_prologue.install(transformer)
    block = transformer.transformer_blocks[0]
    args, rotary = block_call(transformer, seed=2)
    calls, op = [], qk_prologue._join_op
    monkeypatch.setattr(qk_prologue, "_join_op", lambda *a: calls.append(1) or op(*a))
    with torch.no_grad():
        want = block(*args, image_rotary_emb=rotary)
        assert len(calls) == 2  # queries and keys
        torch._dynamo.reset()
        got = torch.compile(block, fullgraph=True)(*args, image_rotary_emb=rotary)
    torch._dynamo.reset()
    assert len(calls) == 4  # traced into the graph (on CPU Inductor compiles the op's PyTorch body)
    for w, g in zip(want, got, strict=True):
        assert torch.allclose(w, g, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["tiny_editor", "tiny_2511_editor"])
def test_an_edit_with_the_fused_prologue_stays_within_its_tolerance(variant, photo, request):
    editor = request.getfixturevalue(variant)  # 2509, and 2511 (zero_cond_t: the condition at timestep 0)
    edit = small_request(photo, seed=6, steps=2)
    plain = editor.edit(edit).image
    transformer = editor.pipe.transformer
    rope.install(transformer)
    assert qk_prologue.install(transformer) > 0
    try:
        fused = editor.edit(edit).image
    finally:
        qk_prologue.uninstall(transformer)
        rope.uninstall(transformer)
    assert_matches_reference("qk-prologue-fused", fused, plain)


@pytest.mark.gpu
@pytest.mark.skipif(not qk_prologue.available(), reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("batch", [1, 2])
def test_the_triton_kernel_matches_the_reference_at_the_real_width(batch):
    from diffusers.models.normalization import RMSNorm

    device = torch.device("cuda")
    txt_norm, img_norm = (RMSNorm(128, eps=1e-6).to(device, torch.bfloat16) for _ in range(2))
    for norm in (txt_norm, img_norm):
        norm.weight.data.uniform_(0.5, 1.5)
    txt = torch.randn(batch, 230, 24, 128, device=device).bfloat16()
    img = torch.randn(batch, 1030, 24, 128, device=device).bfloat16() * 3
    txt_f, img_f = freqs(230, 64).to(device), freqs(1030, 64).to(device)
    got = qk_prologue.norm_rope_join(txt, img, txt_norm, img_norm, txt_f, img_f)
    streams = ((txt, txt_norm, txt_f), (img, img_norm, img_f))
    parts = [qk_prologue.reference(x, norm.weight, f, 1e-6) for x, norm, f in streams]
    want = torch.cat(parts, dim=1)
    assert got.shape == want.shape and torch.isfinite(got).all()
    diff = (got.float() - want.float()).abs()
    assert diff.max().item() <= 0.07  # a bf16 step at |x| ~ 4-8: the sum of squares in another order
    assert (diff > 0).float().mean().item() < 0.05
    values, scales = qk_prologue.norm_rope_join_fp8(txt, img, txt_norm, img_norm, txt_f, img_f)
    from qie.memory.fp8_matmul import to_fp8

    want8 = to_fp8(got, scales[:1, :1, None, None])  # the same kernel's bf16 values, cast as `to_fp8` does
    assert scales.shape == (batch, 24) and torch.isfinite(values.float()).all()
    differ = values.float() != want8.float()
    assert differ.float().mean().item() < 1e-3, differ.float().mean().item()  # last-bit ties, at most
    # where RoPE's two products cancel, the two compilations' roundings (FMA or not) may differ by a
    # bf16 step of the operands, a few fp8 steps of the small result: bounded in fp8 units (typical ~40)
    gap = (values.float() - want8.float()).abs() - want8.float().abs() * 2**-3
    assert gap.max().item() <= 0.5, gap.max().item()


def test_streamed_blocks_run_the_fused_prologue_on_the_weights_bound_for_each_call(transformer, monkeypatch):
    from qie.memory.streaming import BlockStreamer

    transformer.to(torch.bfloat16)
    rope.install(transformer)
    block = transformer.transformer_blocks[0]
    dim = transformer.inner_dim
    torch.manual_seed(4)
    args = (torch.randn(1, 16, dim).bfloat16(), torch.randn(1, 6, dim).bfloat16(), None, torch.randn(1, dim).bfloat16())
    rotary = transformer.pos_embed([[(1, 4, 4)]], max_txt_seq_len=6, device=torch.device("cpu"))
    with torch.no_grad():
        want = block(*args, image_rotary_emb=rotary)
        assert qk_prologue.install(transformer) > 0
        BlockStreamer(transformer.transformer_blocks, torch.device("cpu"), resident=0, compute_dtype=torch.bfloat16)
        assert block.attn.norm_q.weight.numel() == 0  # released between calls: read only when bound
        calls, op = [], qk_prologue._join_op
        monkeypatch.setattr(qk_prologue, "_join_op", lambda *a: calls.append(1) or op(*a))
        for _ in range(2):
            got = block(*args, image_rotary_emb=rotary)
            for w, g in zip(want, got, strict=True):
                assert torch.equal(w, g)
    assert len(calls) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not qk_prologue.available(), reason="needs a CUDA GPU and Triton")
def test_compiled_code_launches_the_kernels_itself_at_any_token_count():
    from diffusers.models.normalization import RMSNorm
    from torch._inductor.utils import run_and_get_code

    device = torch.device("cuda")
    txt_norm, img_norm = (RMSNorm(128, eps=1e-6).to(device, torch.bfloat16) for _ in range(2))
    compiled = torch.compile(qk_prologue.norm_rope_join, dynamic=True, fullgraph=True)
    for text, image in ((230, 1030), (117, 2048)):  # one graph, dynamic in both token counts
        txt = torch.randn(1, text, 24, 128, device=device).bfloat16()
        img = torch.randn(1, image, 24, 128, device=device).bfloat16()
        txt_f, img_f = freqs(text, 64).to(device), freqs(image, 64).to(device)
        with torch.no_grad():  # as pipelines run (with gradients the op stays opaque: it has no backward)
            got, code = run_and_get_code(compiled, txt, img, txt_norm, img_norm, txt_f, img_f)
            want = qk_prologue.norm_rope_join(txt, img, txt_norm, img_norm, txt_f, img_f)
        assert torch.equal(got, want)
    source = "\n".join(code)
    assert "qie_qk_norm_rope" in source and "torch.ops.qie" not in source
