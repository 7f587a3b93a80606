"""Blocks that hand fp8 rows to their projections: LayerNorm + modulation + row quantization in one op."""

import copy

import pytest
import torch
from conftest import block_call, small_request
from oracle import assert_matches_reference

from qie.memory import norm_quantize
from qie.memory.fp8_matmul import Fp8Activations, Fp8RowLinear, project, quantize_rows
from qie.memory.fp8_mlp import fuse_mlp_quantization
from qie.memory.norm_quantize import norm_modulate_quantize, norm_modulate_reference, quantize_activations
from qie.speed import block_prologue, qk_prologue, rope


def same_fp8(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.reshape(b.shape).view(torch.uint8), b.view(torch.uint8))


def test_the_op_is_layernorm_modulation_then_quantize_rows():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16) * 5 + 1
    params = torch.randn(2, 3 * 64, dtype=torch.bfloat16)  # shift, scale, gate: chunk views, as in a block
    shift, scale, _ = block_prologue.modulation(params)
    rows = norm_modulate_quantize(x, shift, scale, 1e-6)
    want_values, want_scales = quantize_rows(norm_modulate_reference(x, shift, scale, 1e-6).reshape(-1, 64))
    assert rows.values.shape == (2, 7, 64) and rows.scales.shape == (2, 7, 1) and rows.dtype == torch.bfloat16
    assert same_fp8(rows.values, want_values)
    assert torch.equal(rows.scales.reshape(-1, 1), want_scales)
    want = torch.nn.functional.layer_norm(x, (64,), eps=1e-6) * (1 + scale) + shift
    assert torch.equal(norm_modulate_reference(x, shift, scale, 1e-6), want)  # diffusers' chain, in bf16
    plain = quantize_activations(x)
    assert same_fp8(plain.values, quantize_rows(x.reshape(-1, 64))[0])


def test_per_token_modulation_selects_as_diffusers_modulate(tiny_2511_editor):
    block = tiny_2511_editor.pipe.transformer.transformer_blocks[0]
    torch.manual_seed(1)
    dim = block.dim
    x, params = torch.randn(2, 5, dim), torch.randn(4, 3 * dim)  # 2511: parameters for two timesteps
    index = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    want, want_gate = block._modulate(x, params, index)
    shift, scale, gate = block_prologue.modulation(params, index)
    assert torch.equal(x * (1 + scale) + shift, want) and torch.equal(gate, want_gate)
    rows = norm_modulate_quantize(x, shift, scale, 1e-6)  # [B, T, D] shift and scale, per token
    ref = norm_modulate_reference(x, shift, scale, 1e-6)
    assert same_fp8(rows.values, quantize_rows(ref.reshape(-1, dim))[0])


def test_project_multiplies_given_rows_and_dequantizes_for_plain_layers():
    torch.manual_seed(2)
    layer = torch.nn.Linear(64, 32)
    fp8 = copy.deepcopy(layer)
    values, scales = quantize_rows(fp8.weight.data)
    Fp8RowLinear.to_fp8_rows(fp8)
    fp8.weight, fp8.weight_scale = torch.nn.Parameter(values, requires_grad=False), scales
    x = torch.randn(3, 5, 64)
    rows = Fp8Activations(*(t.reshape(3, 5, -1) for t in quantize_rows(x.reshape(-1, 64))), torch.float32)
    with torch.no_grad():
        assert torch.equal(project(fp8, rows), fp8(x))  # Fp8RowLinear quantizes x the same way itself
        assert torch.equal(project(layer, rows), layer(rows.dequantize()))
        assert torch.equal(project(layer, x), layer(x))


def fresh(transformer):
    """A copy of `transformer` that runs its own modules: a copied compiled call would run the original's."""
    copied = copy.deepcopy(transformer)
    for module in copied.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    return copied


def to_fp8_blocks(transformer):
    """Every Linear of the blocks stored as fp8 rows (`Fp8RowLinear`, emulated off CUDA), MLPs fused."""
    for name, module in transformer.named_modules():
        if name.startswith("transformer_blocks.") and isinstance(module, torch.nn.Linear):
            values, scales = quantize_rows(module.weight.data)
            Fp8RowLinear.to_fp8_rows(module)
            module.weight = torch.nn.Parameter(values, requires_grad=False)
            module.weight_scale = scales
    assert fuse_mlp_quantization(transformer) == 2 * len(transformer.transformer_blocks)
    return transformer


def forward_call(transformer, batch=1, side=4, text=6, seed=3):
    torch.manual_seed(seed)
    cfg = transformer.config
    hidden = torch.randn(batch, 2 * side * side, cfg.in_channels)  # output latents + one condition image
    return {
        "hidden_states": hidden,
        "encoder_hidden_states": torch.randn(batch, text, cfg.joint_attention_dim),
        "encoder_hidden_states_mask": torch.ones(batch, text, dtype=torch.bool),
        "timestep": torch.full((batch,), 0.5),
        "img_shapes": [[(1, side, side), (1, side, side)]] * batch,
        "return_dict": False,
    }


@pytest.mark.parametrize("variant", ["tiny_editor", "tiny_2511_editor"])
def test_fp8_blocks_with_the_fused_prologue_compute_what_the_unfused_compute(variant, request, monkeypatch):
    transformer = to_fp8_blocks(fresh(request.getfixturevalue(variant).pipe.transformer))
    rope.install(transformer)
    assert block_prologue.install(transformer) == 0  # diffusers' processor: not ready
    qk_prologue.install(transformer)
    calls, op, add_op = [], norm_quantize._norm_quantize_op, norm_quantize._add_norm_quantize_op
    monkeypatch.setattr(norm_quantize, "_norm_quantize_op", lambda *a: calls.append("norm" if a[-1] else "") or op(*a))
    monkeypatch.setattr(norm_quantize, "_add_norm_quantize_op", lambda *a: calls.append("add") or add_op(*a))
    call = forward_call(transformer)
    with torch.no_grad():
        want = transformer(**call)[0]
        assert calls == []
        n = len(transformer.transformer_blocks)
        assert block_prologue.install(transformer) == n and block_prologue.installed(transformer)
        assert block_prologue.install(transformer) == 0  # once only
        names = {type(b).__name__ for b in transformer.transformer_blocks}
        assert names == set(transformer._repeated_blocks)  # regional compile finds blocks by class name
        got = transformer(**call)[0]
        assert calls == ["norm", "norm", "", "", "add", "add"] * n  # norm1 x 2, attention outputs, sum + norm2 x 2
        block_prologue.uninstall(transformer)
        assert not block_prologue.installed(transformer)
        again = transformer(**call)[0]
    assert torch.equal(got, want) and torch.equal(again, want)


def test_blocks_whose_projections_are_not_fp8_rows_keep_diffusers_forward(tiny_editor):
    transformer = fresh(tiny_editor.pipe.transformer)
    rope.install(transformer)
    qk_prologue.install(transformer)
    assert block_prologue.install(transformer) == 0  # bf16 weights
    to_fp8_blocks(transformer)
    transformer.transformer_blocks[1].attn.to_v.__class__ = torch.nn.Linear  # one projection in bf16
    assert block_prologue.install(transformer) == len(transformer.transformer_blocks) - 1


def test_a_forward_left_by_removed_hooks_is_dropped_and_a_live_one_kept(tiny_editor):
    transformer = to_fp8_blocks(fresh(tiny_editor.pipe.transformer))
    rope.install(transformer)
    qk_prologue.install(transformer)
    first, second = transformer.transformer_blocks[:2]
    first.forward = first.forward  # diffusers' hook registry leaves the class's forward bound, as here
    second.forward = lambda *args, **kwargs: None  # a live wrapper: the block stays as it is
    assert block_prologue.install(transformer) == len(transformer.transformer_blocks) - 1
    assert "forward" not in vars(first) and isinstance(first, block_prologue.Fp8PrologueBlock)
    assert not isinstance(second, block_prologue.Fp8PrologueBlock)
    first.forward = first.forward  # hooks added and removed while the fused class is on
    block_prologue.uninstall(transformer)
    assert "forward" not in vars(first) and not block_prologue.installed(transformer)


def test_calls_the_processor_cannot_fuse_run_diffusers_forward(tiny_editor):
    transformer = to_fp8_blocks(fresh(tiny_editor.pipe.transformer))
    rope.install(transformer)
    qk_prologue.install(transformer)
    call = forward_call(transformer)
    with torch.no_grad():
        want = transformer(**call)[0]
        block_prologue.install(transformer)
        rope.uninstall(transformer)  # complex frequencies: diffusers' prologue, diffusers' block forward
        got = transformer(**call)[0]
    assert torch.equal(got, want)


def test_a_compiled_fused_block_matches_eager(tiny_editor):
    transformer = to_fp8_blocks(fresh(tiny_editor.pipe.transformer))
    rope.install(transformer)
    qk_prologue.install(transformer)
    block_prologue.install(transformer)
    block = transformer.transformer_blocks[0]
    args, rotary = block_call(transformer, seed=4)
    with torch.no_grad():
        want = block(*args, image_rotary_emb=rotary)
        torch._dynamo.reset()
        got = torch.compile(block, fullgraph=True)(*args, image_rotary_emb=rotary)
    torch._dynamo.reset()
    for w, g in zip(want, got, strict=True):
        assert ((g - w).norm() / w.norm()).item() < 0.02  # Inductor's float32 roundings move fp8 ties


def test_an_fp8_edit_with_the_fused_prologue_stays_within_its_tolerance(tiny_editor, photo):
    editor = tiny_editor
    original = editor.pipe.transformer
    transformer = to_fp8_blocks(fresh(original))
    rope.install(transformer)
    qk_prologue.install(transformer)
    edit = small_request(photo, seed=6, steps=2)
    editor.pipe.transformer = transformer
    try:
        plain = editor.edit(edit).image
        assert block_prologue.install(transformer) > 0
        fused = editor.edit(edit).image
    finally:
        editor.pipe.transformer = original
    assert_matches_reference("block-prologue-fused", fused, plain)


@pytest.mark.gpu
@pytest.mark.skipif(not qk_prologue.available(), reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("per_token", [False, True])
def test_the_triton_kernel_matches_the_reference_at_the_real_width(per_token):
    device = torch.device("cuda")
    torch.manual_seed(5)
    x = (torch.randn(2, 1030, 3072, device=device) * 4 + 1).bfloat16()
    params = torch.randn(4 if per_token else 2, 3 * 3072, device=device).bfloat16()
    index = (torch.arange(1030, device=device) >= 500).long().expand(2, -1) if per_token else None
    shift, scale, gate = block_prologue.modulation(params, index)
    rows = norm_modulate_quantize(x, shift, scale, 1e-6)
    ref = norm_modulate_reference(x, shift, scale, 1e-6).reshape(-1, 3072)
    values, scales = quantize_rows(ref)
    # eager rounds the row maximum's chain three times in bf16 (LayerNorm, product, sum); the kernel once (h200-bi:
    # 2**-7 was too tight)
    assert torch.allclose(rows.scales.reshape(-1, 1), scales, rtol=2**-5, atol=0)
    differ = (rows.values.reshape(-1, 3072).float() != values.float()).float().mean().item()
    assert differ < 0.1, differ  # one rounding against eager's three: values one fp8 step apart (h200-be: 3.8 %)
    got, want = rows.values.reshape(-1, 3072).float() * rows.scales.reshape(-1, 1), values.float() * scales
    assert ((got - want).norm() / want.norm()).item() < 3e-2  # those steps: ~1 % of the rows' norm
    # as close to the exact (float32) chain as PyTorch's bf16 chain is
    exact = torch.nn.functional.layer_norm(x.float(), (3072,), eps=1e-6) * (1 + scale.float()) + shift.float()
    exact = exact.reshape(-1, 3072)

    def rel(a):
        return ((a - exact).norm() / exact.norm()).item()

    assert rel(got) <= 1.05 * rel(want), (rel(got), rel(want))
    y = torch.randn_like(x)
    summed, after = norm_quantize.add_norm_modulate_quantize(x, gate, y, shift, scale, 1e-6)
    eager = x + gate * y  # bf16 ops: the product rounded, then the sum
    once = (x.float() + gate.float() * y.float()).bfloat16()  # float32, rounded once: the kernel's arithmetic
    assert (summed != once).float().mean().item() < 1e-3  # a fused multiply-add's last bit, at most
    # within a bf16 step of eager's sum, plus eager's rounding of the product where the two terms cancel
    bound = eager.float().abs() * 2**-7 + (gate * y).float().abs() * 2**-8
    assert ((summed.float() - eager.float()).abs() <= bound).all()
    ref_values, ref_scales = quantize_rows(norm_modulate_reference(summed, shift, scale, 1e-6).reshape(-1, 3072))
    assert torch.allclose(after.scales.reshape(-1, 1), ref_scales, rtol=2**-5, atol=0)
    assert (after.values.reshape(-1, 3072).float() != ref_values.float()).float().mean().item() < 0.1
    joint = torch.randn(2, 1260, 3072, device=device).bfloat16() * 3
    for part in (joint[:, :230], joint[:, 230:]):  # token slices of the attention output, read in place
        plain = quantize_activations(part)
        want_values, want_scales = quantize_rows(part.reshape(-1, 3072))
        assert torch.equal(plain.scales.reshape(-1, 1), want_scales) and plain.scales.data_ptr() % 16 == 0
        assert (plain.values.reshape(-1, 3072).float() != want_values.float()).float().mean().item() < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not qk_prologue.available(), reason="needs a CUDA GPU and Triton")
def test_torchao_fp8_blocks_compiled_with_the_prologue_stay_as_close_to_bf16(tiny_editor):
    pytest.importorskip("torchao")
    from torch._inductor.utils import run_and_get_code

    from qie.memory.quantize import has_fp8, quantize_transformer

    device = torch.device("cuda")
    if not has_fp8(device):
        pytest.skip("needs a GPU with fp8 units")
    bf16 = fresh(tiny_editor.pipe.transformer).to(device, torch.bfloat16)
    fused, plain = copy.deepcopy(bf16), copy.deepcopy(bf16)
    for model in (fused, plain):
        quantize_transformer(model, device, fuse_mlp=True)
        rope.install(model)
        qk_prologue.install(model)
    assert block_prologue.install(fused) == len(fused.transformer_blocks)
    call = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in forward_call(bf16, side=16).items()}
    for key in ("hidden_states", "encoder_hidden_states"):
        call[key] = call[key].bfloat16()
    block = fused.transformer_blocks[0]
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        ref, want = bf16(**call)[0].float(), plain(**call)[0].float()
        got = fused(**call)[0].float()
        hidden = call["hidden_states"].new_empty(1, 512, fused.inner_dim).normal_()
        text = call["hidden_states"].new_empty(1, 6, fused.inner_dim).normal_()
        args = (hidden, text, None, torch.randn(1, fused.inner_dim, device=device).bfloat16())
        rotary = fused.pos_embed([[(1, 16, 16), (1, 16, 16)]], max_txt_seq_len=6, device=device)
        _, code = run_and_get_code(compiled, *args, image_rotary_emb=rotary)
    torch._dynamo.reset()

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(got, ref) <= 1.1 * rel(want, ref) + 1e-3, (rel(got, ref), rel(want, ref))
    source = "\n".join(code)
    assert "qie_norm_modulate_quantize" in source and "torch.ops.qie" not in source


def test_2511s_text_modulation_is_computed_from_the_first_half_of_the_samples_as_diffusers_does():
    torch.manual_seed(0)
    img_mod, txt_mod = (torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(8, 12)) for _ in range(2))
    temb = torch.randn(2, 8)  # zero_cond_t: the samples' timesteps, then the condition's zero timesteps
    with torch.no_grad():
        img, txt = block_prologue.modulations(img_mod, txt_mod, temb, zero_cond_t=True)
        assert torch.equal(img, img_mod(temb))
        assert torch.equal(txt, txt_mod(torch.chunk(temb, 2, dim=0)[0]))  # not a slice of a 2-row product
        img, txt = block_prologue.modulations(img_mod, txt_mod, temb)
        assert torch.equal(txt, txt_mod(temb))
