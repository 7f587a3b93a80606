"""The Triton products of few rows: the text stream's fp8 GEMMs and the blocks' joint modulation."""

import pytest
import torch
from torch import nn

from qie.memory import few_rows_gemm
from qie.memory.few_rows_gemm import TILE, fp8_rows_gemm, serves, silu_linears, silu_linears_fusable, tile_for
from qie.memory.fp8_matmul import Fp8RowLinear, cublas_rows, quantize_rows, scaled_mm_rows
from qie.speed.block_prologue import _modulation_rows, modulations

CUDA = torch.cuda.is_available() and few_rows_gemm.TRITON


def fp8_modulation(width: int, out: int, dtype=torch.float32) -> nn.Sequential:
    """A diffusers modulation layer, `Sequential(SiLU, Linear)`, with its weight stored as fp8 rows."""
    torch.manual_seed(out)
    mod = nn.Sequential(nn.SiLU(), nn.Linear(width, out)).to(dtype)
    values, scales = quantize_rows(mod[1].weight.data / width**0.5)
    Fp8RowLinear.to_fp8_rows(mod[1])
    mod[1].weight = nn.Parameter(values, requires_grad=False)
    mod[1].weight_scale = scales
    return mod


def test_the_tile_kernel_takes_only_the_shapes_where_it_was_measured_faster():
    assert tile_for(234, 3072, 3072) == TILE  # the text stream's q/k/v and output projections
    assert tile_for(234, 12288, 3072) == TILE  # its MLP's output layer
    assert tile_for(1, 3072, 3072) == TILE
    assert tile_for(234, 3072, 12288) is None  # the MLP's wide first layer: cuBLAS
    assert tile_for(468, 3072, 3072) is None  # batched CFG's two prompts: cuBLAS
    assert tile_for(8192, 3072, 3072) is None  # the image stream
    assert tile_for(234, 3000, 3072) is None and tile_for(234, 3072, 3000) is None  # not whole tiles
    assert tile_for(0, 3072, 3072) is None


def test_products_off_cuda_stay_with_scaled_mm_rows_emulation():
    xq, xs = quantize_rows(torch.randn(5, 256))
    values, scales = quantize_rows(torch.randn(128, 256))
    assert not serves(xq, values)
    bias = torch.randn(128)
    want = ((xq.float() @ values.float().t()) * xs * scales.t()).to(torch.bfloat16) + bias.to(torch.bfloat16)
    assert torch.equal(scaled_mm_rows(xq, xs, values, scales, bias, torch.bfloat16), want)
    assert torch.equal(fp8_rows_gemm(xq, xs, values, scales, bias, torch.bfloat16), want)  # the op's own fallback


def test_modulations_off_cuda_are_the_layers_themselves():
    img, txt = fp8_modulation(256, 96), fp8_modulation(256, 64)
    temb = torch.randn(2, 256).bfloat16()
    assert not silu_linears_fusable(temb, _modulation_rows(img), _modulation_rows(txt))
    with torch.no_grad():
        got_img, got_txt = modulations(img, txt, temb.float())
        assert torch.equal(got_img, img(temb.float())) and torch.equal(got_txt, txt(temb.float()))


def test_the_modulation_op_multiplies_silu_values_by_the_fp8_weights_without_quantizing_them():
    img, txt = fp8_modulation(256, 96), fp8_modulation(256, 64)
    temb = torch.randn(1, 256).bfloat16()
    a = (img[1].weight, img[1].weight_scale, img[1].bias.data.bfloat16())
    b = (txt[1].weight, txt[1].weight_scale, txt[1].bias.data.bfloat16())
    got_img, got_txt = silu_linears(temb, a, b)
    silu = nn.functional.silu(temb).float()
    for got, (values, scales, bias) in ((got_img, a), (got_txt, b)):
        want = ((silu @ values.float().t()) * scales.t() + bias.float()).to(torch.bfloat16)
        assert torch.equal(got, want)
        quantized = quantize_rows(silu)  # what an fp8-activation GEMM would have multiplied instead
        assert not torch.equal(got, scaled_mm_rows(*quantized, values, scales, bias, torch.bfloat16))


def test_modulations_need_fp8_rows_with_a_bias_on_both_layers():
    plain = nn.Sequential(nn.SiLU(), nn.Linear(256, 96))
    fp8 = fp8_modulation(256, 96)
    assert _modulation_rows(plain) is None
    assert _modulation_rows(fp8) is not None
    fp8[1].bias = None
    assert _modulation_rows(fp8) is None
    assert _modulation_rows(nn.Linear(4, 4)) is None


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("shape", [(234, 3072, 3072), (77, 12288, 3072), (1, 3072, 3072), (256, 3072, 1024)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_tile_kernel_matches_cublas_at_the_text_streams_shapes(shape, with_bias):
    m, k, n = shape
    xq, xs = quantize_rows(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    values, scales = quantize_rows(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if with_bias else None
    assert serves(xq, values)
    got = fp8_rows_gemm(xq, xs, values, scales, bias, torch.bfloat16)
    want = cublas_rows(xq, xs, values, scales, bias, torch.bfloat16)
    exact = (xq.float() @ values.float().t()) * xs * scales.t() + (0 if bias is None else bias.float())
    # fp8 tensor-core sums (Triton's, like cuBLAS's fast accumulation) round more often than float32 FMAs:
    # as close to the float32 result as cuBLAS's, and within a bf16 rounding of it
    assert rel(got, exact) <= 1.5 * rel(want, exact) + 1e-4, (rel(got, exact), rel(want, exact))
    assert rel(got, exact) < 2**-8
    assert torch.equal(scaled_mm_rows(xq, xs, values, scales, bias, torch.bfloat16), got)  # routed here


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("rows", [1, 2])
def test_the_joint_modulation_kernel_matches_its_reference_and_stays_closer_to_bf16(rows):
    width = 3072
    img, txt = (fp8_modulation(width, n, torch.bfloat16).cuda() for n in (6 * width, 6 * width))
    temb = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
    assert silu_linears_fusable(temb, _modulation_rows(img), _modulation_rows(txt))
    with torch.no_grad():
        got_img, got_txt = modulations(img, txt, temb)
        silu = nn.functional.silu(temb).float()
        for got, mod in ((got_img, img), (got_txt, txt)):
            values, scales, bias = mod[1].weight, mod[1].weight_scale, mod[1].bias
            exact = (silu @ values.float().t()) * scales.t() + bias.float()
            assert rel(got, exact) < 2**-8  # float32 sums, one rounding to bf16
            quantized = scaled_mm_rows(*quantize_rows(silu.bfloat16()), values, scales, bias, torch.bfloat16)
            assert (got.float() - exact).norm() < (quantized.float() - exact).norm()  # no fp8 rounding of temb


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and Triton")
def test_compiled_code_launches_both_kernels_itself_at_any_row_count():
    from torch._inductor.utils import run_and_get_code

    img, txt = (fp8_modulation(3072, 18432, torch.bfloat16).cuda() for _ in range(2))
    values, scales = quantize_rows(torch.randn(3072, 3072, device="cuda", dtype=torch.bfloat16))

    def block(xq, xs, temb):
        a, b = modulations(img, txt, temb)
        return scaled_mm_rows(xq, xs, values, scales, None, torch.bfloat16), a, b

    compiled = torch.compile(block, dynamic=True, fullgraph=True)
    temb = torch.randn(1, 3072, device="cuda", dtype=torch.bfloat16)
    sources = []
    with torch.no_grad():
        for rows in (200, 230):  # one graph, dynamic in the rows
            xq, xs = quantize_rows(torch.randn(rows, 3072, device="cuda", dtype=torch.bfloat16))
            got, code = run_and_get_code(compiled, xq, xs, temb)
            sources += code
            want = block(xq, xs, temb)
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    torch._dynamo.reset()
    source = "\n".join(sources)
    assert "qie_fp8_rows_gemm" in source and "qie_silu_modulations" in source
    assert "torch.ops.qie" not in source
