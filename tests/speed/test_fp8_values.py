"""The joint attention's values as fp8 (`qie.speed.fp8_values`): quantize_heads of the join, bit for bit."""

import pytest
import torch

from qie.memory.fp8_matmul import MIN_SCALE
from qie.speed import fa3, fp8_values


def streams(device="cpu", batch=2, text=7, image=19, heads=3, dim=16):
    torch.manual_seed(5)
    spread = torch.tensor([1.0, 30.0, 1e-3, 300.0][:heads], device=device)[None, None, :, None]
    txt = torch.randn(batch, text, heads, dim, device=device) * spread
    img = torch.randn(batch, image, heads, dim, device=device) * spread
    return txt.bfloat16(), img.bfloat16()


def as_bytes(values: torch.Tensor) -> torch.Tensor:
    return values.view(torch.uint8)


def test_off_cuda_it_is_quantize_heads_of_the_joined_values():
    txt, img = streams()
    values, scale = fp8_values.join_fp8(txt, img)
    want, want_scale = fa3.quantize_heads(torch.cat([txt, img], dim=1))
    assert torch.equal(as_bytes(values), as_bytes(want)) and torch.equal(scale, want_scale)
    # each head's largest magnitude over both streams sets its scale
    amax = torch.cat([txt, img], dim=1).float().abs().amax(dim=(1, 3))
    assert torch.equal(scale, (amax / 448).clamp(min=MIN_SCALE))
    assert not fp8_values.fusable(txt, img)  # no CUDA here: the reference serves


def test_unfused_runs_the_reference_and_restores():
    with fp8_values.unfused():
        assert fp8_values._unfused
        with fp8_values.unfused():
            pass
        assert fp8_values._unfused  # nested: the outer one still holds
    assert not fp8_values._unfused


gpu = pytest.mark.skipif(not torch.cuda.is_available() or fp8_values._triton_kernels() is None, reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("text,image", [(234, 8192), (7, 100), (65, 63)])
def test_the_kernels_equal_the_reference_bit_for_bit(text, image):
    txt, img = streams("cuda", batch=2, text=text, image=image, heads=4, dim=128)
    img[1, 3, 2, 5] = 0.0  # a head whose largest value sits in one sample only
    img[0, :, 1] = 0.0
    txt[0, :, 1] = 0.0  # a head of zeros: the smallest scale, zero values
    want, want_scale = fp8_values.reference(txt, img)
    assert fp8_values.fusable(txt, img)
    values, scale = fp8_values.join_fp8(txt, img)
    assert scale[0, 1] == MIN_SCALE
    assert torch.equal(scale, want_scale) and torch.equal(as_bytes(values), as_bytes(want))
    # strided streams (a view of a wider projection output) read in place or copied, the same result
    wide = torch.cat([img, img], dim=-1)[..., :128]
    again, _ = fp8_values.join_fp8(txt, wide)
    assert torch.equal(as_bytes(again), as_bytes(want))


@pytest.mark.gpu
@gpu
def test_compiled_code_launches_the_kernels_at_any_token_count():
    from torch._inductor.utils import run_and_get_code

    compiled = torch.compile(fp8_values.join_fp8, dynamic=True, fullgraph=True)
    for text, image in ((230, 1030), (117, 2048)):
        txt, img = streams("cuda", batch=1, text=text, image=image, heads=4, dim=128)
        with torch.no_grad():
            (values, scale), code = run_and_get_code(compiled, txt, img)
        want, want_scale = fp8_values.reference(txt, img)
        assert torch.equal(scale, want_scale) and torch.equal(as_bytes(values), as_bytes(want))
    source = "\n".join(code)
    assert "qie_value_amax" in source and "qie_value_fp8" in source and "torch.ops.qie" not in source
