"""FA3 joint attention: masks become kept-key counts (keys reordered), checked against masked SDPA."""

import dataclasses

import pytest
import torch
from conftest import small_request
from oracle import assert_matches_reference

from qie.speed import fa3


def masked_sdpa(q, k, v, mask):
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


def random_case(b=3, s=40, h=2, d=16, device="cpu", dtype=torch.float32):
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype) for _ in range(3))
    keep = torch.rand(b, s, device=device) > 0.4  # scattered holes, not only padding at the end
    keep[:, 0] = True
    keep[0] = True  # one sample without padding
    return q, k, v, keep[:, None, None, :]


def test_kept_keys_first_then_counts_equal_the_masked_attention():
    q, k, v, mask = random_case()
    k2, v2, used = fa3.kept_keys_first(k, v, mask)
    assert used.tolist() == mask.reshape(3, -1).sum(1).tolist() and used.dtype == torch.int32
    for i in range(3):  # the kept keys, in their order, then the dropped ones
        kept = mask.reshape(3, -1)[i]
        assert torch.equal(k2[i, : used[i]], k[i, kept]) and torch.equal(v2[i, used[i] :], v[i, ~kept])
    got = fa3.joint_attention(q, k, v, mask, kernel=fa3.reference_kernel, fallback=None)
    assert torch.allclose(got, masked_sdpa(q, k, v, mask), atol=1e-5)
    unmasked = fa3.joint_attention(q, k, v, None, kernel=fa3.reference_kernel, fallback=None)
    assert torch.allclose(unmasked, masked_sdpa(q, k, v, None), atol=1e-6)


def test_calls_the_kernel_cannot_serve_go_to_the_fallback():
    q, k, v, mask = random_case()
    seen = []

    def fallback(*args, **kwargs):
        seen.append(kwargs)
        return "fallback"

    def kernel(*args):
        return "fa3"

    kernel.hopper_only = True  # as FA3's own kernels are marked
    result = fa3.joint_attention(q, k, v, mask, kernel=kernel, fallback=fallback, backend=None)
    assert result == "fallback" and seen[0]["attn_mask"] is mask  # float32 on the CPU
    assert fa3.REPLACES == ("None", "native", "_native_cudnn")  # a per-request SageAttention backend stays


def test_installed_attention_keeps_batched_cfg_within_its_tolerance(tiny_editor, photo):
    request = small_request(photo, seed=5, steps=2, batch_cfg=True)
    two_calls = tiny_editor.edit(dataclasses.replace(request, batch_cfg=False)).image
    assert fa3.install(torch.device("cpu"), kernel=fa3.reference_kernel)
    try:
        batched = tiny_editor.edit(request).image
    finally:
        fa3.uninstall()
    module = __import__(fa3.QWEN_MODULE, fromlist=["x"])
    assert not hasattr(module, "_qie_dispatch") and module.dispatch_attention_fn.__module__.endswith("dispatch")
    assert_matches_reference("batched-cfg", batched, two_calls)


# Relative error bounds on random inputs: bf16 FA3 2.3e-3, fp8 5.3e-2 (an H200, 8422 tokens).
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision,bound", [("bf16", 1e-2), ("fp8", 8e-2), ("fp8 prequantized", 8e-2)])
def test_fa3_on_hopper_matches_masked_sdpa(precision, bound):
    dev = torch.device("cuda")
    if not fa3.available(dev):
        pytest.skip("needs a Hopper GPU and the fa3-fwd package")
    q, k, v, mask = random_case(b=2, s=1000, h=4, d=128, device="cuda", dtype=torch.bfloat16)
    if precision == "fp8 prequantized":  # queries and keys in fp8 already (the fused prologue's output)
        (q8, qs), (k8, ks) = fa3.quantize_heads(q), fa3.quantize_heads(k)
        got = fa3.prequantized_attention(q8, qs, k8, ks, *fa3.quantize_heads(v), mask, fa3.fa3_fp8_forward())
    else:
        kernel = fa3.fa3_kernel() if precision == "bf16" else fa3.fa3_fp8_kernel()
        got = fa3.joint_attention(q, k, v, mask, kernel=kernel, fallback=None)
    ref = masked_sdpa(q.float(), k.float(), v.float(), mask)
    assert got.dtype == torch.bfloat16 and ((got.float() - ref).norm() / ref.norm()).item() < bound


def test_quantize_heads_maps_each_heads_largest_value_to_the_fp8_maximum():
    x = torch.randn(2, 30, 3, 16) * torch.tensor([1.0, 10.0, 1000.0])[None, None, :, None]
    values, scale = fa3.quantize_heads(x)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (2, 3)
    assert torch.allclose(values.float().abs().amax(dim=(1, 3)), torch.full((2, 3), 448.0))
    back = values.float() * scale[:, None, :, None]
    assert ((back - x).abs() <= x.abs() * 2**-4 + scale[:, None, :, None] * 2**-9).all()  # e4m3: 3 mantissa bits


def test_fp8_attention_runs_only_inside_its_context_and_restores_bf16(tiny_editor, photo):
    from qie.speed.attention import quantized_attention

    calls = []

    def spy(name, kernel):
        def run(*args):
            calls.append(name)
            return kernel(*args)

        return run

    request = small_request(photo, seed=3, steps=2)
    plain = tiny_editor.edit(request).image
    assert fa3.install(
        torch.device("cpu"),
        kernel=spy("bf16", fa3.reference_kernel),
        fp8_kernel=spy("fp8", fa3.reference_fp8_kernel),
    )
    backend = tiny_editor.speed.attention_backend
    tiny_editor.speed.attention_backend = fa3.NAME
    try:
        quantized = tiny_editor.edit(dataclasses.replace(request, attention_quant="fp8"))
        assert set(calls) == {"fp8"} and any("FlashAttention-3 fp8" in n for n in quantized.notes)
        calls.clear()
        again = tiny_editor.edit(request).image
        assert set(calls) == {"bf16"}
        facts = tiny_editor.speed.facts
        with quantized_attention(tiny_editor.pipe.transformer, "fp8", "native", facts) as note:
            assert "unavailable" in note  # not under FA3: SageAttention's path, not installed here
    finally:
        tiny_editor.speed.attention_backend = backend
        fa3.uninstall()
    assert_matches_reference("default-no-fixes", again, plain)  # the bf16 reference kernel: same image
    assert_matches_reference("attention-fa3-fp8", quantized.image, plain)


@pytest.mark.parametrize("fused_prologue", [False, True])
def test_fp8_attention_switches_the_graph_of_compiled_blocks_and_back(photo, fused_prologue):
    """The toggle must reach blocks compiled before it: the first fp8 call traces its own graph
    (also through `qie.speed.qk_prologue`'s processor, which looks the dispatcher up at call time)."""
    import numpy as np

    from qie import Editor
    from qie.speed import qk_prologue, rope
    from qie.speed.compile import uncompile_blocks

    def negated(q, k, v, used):  # a kernel whose output shows that it ran
        return -fa3.reference_kernel(q, k, v, used)

    editor = Editor.load("tiny")  # its own transformer: compiling the shared one would leak
    torch._dynamo.reset()
    assert fa3.install(torch.device("cpu"), kernel=fa3.reference_kernel, fp8_kernel=negated)
    if fused_prologue:
        rope.install(editor.pipe.transformer)
        assert qk_prologue.install(editor.pipe.transformer) > 0
    editor.pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    request = small_request(photo, seed=2, steps=2)
    try:
        plain = np.asarray(editor.edit(request).image)
        with fa3.fp8_attention():
            switched = np.asarray(editor.edit(request).image)
        again = np.asarray(editor.edit(request).image)
    finally:
        uncompile_blocks(editor.pipe.transformer)
        fa3.uninstall()
    assert (plain != switched).any() and (plain == again).all()
    assert not qk_prologue.installed(editor.pipe.transformer)  # uncompile_blocks gave diffusers' processor back
