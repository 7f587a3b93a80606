"""The MLP's fused GELU + fp8 row quantization: same arithmetic as the unfused fp8 MLP, one pass on a GPU."""

import pytest
import torch
from diffusers.models.attention import FeedForward

from qie.memory.fp8_matmul import Fp8RowLinear, fp8_rows, quantize_rows
from qie.memory.fp8_mlp import (
    Fp8GeluFeedForward,
    fuse_mlp_quantization,
    gelu_quantize_reference,
    gelu_quantize_rows,
)


def fp8_mlp(dim=64, seed=0, activation="gelu-approximate") -> FeedForward:
    """A diffusers MLP whose output layer holds fp8 rows (as the stream plan stores it)."""
    torch.manual_seed(seed)
    ff = FeedForward(dim, dim_out=dim, activation_fn=activation).to(torch.bfloat16).eval()
    out = ff.net[2]
    values, scales = quantize_rows(out.weight.data)
    Fp8RowLinear.to_fp8_rows(out)
    out.weight = torch.nn.Parameter(values, requires_grad=False)
    out.weight_scale = scales
    return ff


def test_the_fused_mlp_computes_what_the_unfused_fp8_mlp_computes():
    fused, plain = fp8_mlp(), fp8_mlp()
    assert Fp8GeluFeedForward.fuse(fused) and isinstance(fused, FeedForward)
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16) * 3
    with torch.no_grad():
        got, want = fused(x), plain(x)
    assert got.shape == want.shape and torch.equal(got, want)
    values, scales = gelu_quantize_rows(x.reshape(-1, 64))
    assert values.dtype == torch.float8_e4m3fn and scales.shape == (14, 1)
    assert scales.max().item() * 448 == pytest.approx(
        torch.nn.functional.gelu(x, approximate="tanh").abs().max().item(), rel=1e-6
    )


def test_the_fused_mlp_compiles_into_one_graph():
    fused, plain = fp8_mlp(), fp8_mlp()
    Fp8GeluFeedForward.fuse(fused)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        got = torch.compile(fused, fullgraph=True)(x)
        want = plain(x)
    assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() < 0.02


def test_mlps_it_cannot_serve_stay_as_they_are():
    bf16 = FeedForward(64, dim_out=64, activation_fn="gelu-approximate")
    exact_gelu = fp8_mlp(activation="gelu")
    assert fp8_rows(bf16.net[2]) is None
    assert not Fp8GeluFeedForward.fuse(bf16) and type(bf16) is FeedForward
    assert not Fp8GeluFeedForward.fuse(exact_gelu) and type(exact_gelu) is FeedForward


def test_every_block_mlp_with_fp8_rows_is_fused_with_one_class(tiny_editor):
    import copy

    transformer = copy.deepcopy(tiny_editor.pipe.transformer)
    assert fuse_mlp_quantization(transformer) == 0  # bf16 weights: nothing to fuse
    for block in transformer.transformer_blocks:
        for ff in (block.img_mlp, block.txt_mlp):
            out = ff.net[2]
            values, scales = quantize_rows(out.weight.data)
            Fp8RowLinear.to_fp8_rows(out)
            out.weight = torch.nn.Parameter(values, requires_grad=False)
            out.weight_scale = scales
    n = len(transformer.transformer_blocks)
    assert fuse_mlp_quantization(transformer) == 2 * n
    classes = {type(b.img_mlp) for b in transformer.transformer_blocks} | {
        type(b.txt_mlp) for b in transformer.transformer_blocks
    }
    assert len(classes) == 1  # compiled blocks share one graph only if their modules share classes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_triton_pass_matches_the_reference_at_the_real_width():
    h = torch.randn(1000, 12288, device="cuda", dtype=torch.bfloat16) * 2
    values, scales = gelu_quantize_rows(h)
    ref_values, ref_scales = gelu_quantize_reference(h)
    assert torch.allclose(scales, ref_scales, rtol=2**-7, atol=0)  # at most one bf16 step of the row maximum
    differ = (values.float() != ref_values.float()).float().mean().item()
    assert differ < 1e-3  # tanh by another formula, fast division: a rare last-bit rounding of GELU
    got, want = values.float() * scales, ref_values.float() * ref_scales
    assert ((got - want).norm() / want.norm()).item() < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torchao_fp8_mlps_are_fused_and_agree_with_the_unfused(tiny_editor):
    import copy

    pytest.importorskip("torchao")
    from qie.memory.quantize import has_fp8, quantize_transformer

    device = torch.device("cuda")
    if not has_fp8(device):
        pytest.skip("needs a GPU with fp8 units")
    fused = copy.deepcopy(tiny_editor.pipe.transformer).to(device, torch.bfloat16)
    plain, bf16 = copy.deepcopy(fused), copy.deepcopy(fused)
    quantize_transformer(fused, device, fuse_mlp=True)
    quantize_transformer(plain, device, fuse_mlp=False)
    assert isinstance(fused.transformer_blocks[0].img_mlp, Fp8GeluFeedForward)
    assert not isinstance(plain.transformer_blocks[0].img_mlp, Fp8GeluFeedForward)
    x = torch.randn(1, 40, fused.transformer_blocks[0].img_mlp.net[0].proj.in_features, device=device)
    with torch.no_grad():
        got, want, ref = (m.transformer_blocks[0].img_mlp(x.bfloat16()).float() for m in (fused, plain, bf16))

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    # The fused kernel quantizes GELU's float32 result; the unfused path rounds it to bf16 first, so about
    # one value in thirty lands on the neighbouring fp8 step: ~1 % apart, each as far from bf16 as the other.
    assert rel(got, want) < 2e-2
    assert rel(got, ref) <= 1.1 * rel(want, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_code_launches_the_kernel_itself_at_any_row_count():
    from torch._inductor.utils import run_and_get_code

    compiled = torch.compile(gelu_quantize_rows, dynamic=True, fullgraph=True)
    for rows in (1000, 1237):  # one graph, dynamic in the rows
        h = torch.randn(rows, 12288, device="cuda", dtype=torch.bfloat16) * 2
        (values, scales), code = run_and_get_code(compiled, h)
        eager_values, eager_scales = gelu_quantize_rows(h)
        assert torch.equal(values.view(torch.uint8), eager_values.view(torch.uint8))
        assert torch.equal(scales, eager_scales)
    source = "\n".join(code)
    assert "qie_gelu_quantize_rows" in source  # Inductor's wrapper launches the Triton kernel
    assert "torch.ops.qie" not in source  # no call back into the op through the dispatcher


def test_row_tiles_cover_a_row_exactly_with_power_of_two_tiles():
    from qie.memory.fp8_mlp import row_tiles

    assert row_tiles(12288) == (4096, 3)  # the MLP's hidden width
    assert row_tiles(3072) == (1024, 3)
    assert row_tiles(4096) == (4096, 1)
    assert row_tiles(5120) is None  # five tiles of 1024: more than the kernel holds
    assert row_tiles(3000) is None and row_tiles(96) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_tiled_kernel_writes_what_the_whole_row_kernel_writes():
    from qie.memory.fp8_mlp import _launch

    for cols in (12288, 3072, 8192, 256):
        h = torch.randn(777, cols, device="cuda", dtype=torch.bfloat16) * 2
        tiled, row = _launch(h, tiled=True), _launch(h, tiled=False)
        assert torch.equal(tiled[0].view(torch.uint8), row[0].view(torch.uint8)), cols
        assert torch.equal(tiled[1], row[1]), cols
