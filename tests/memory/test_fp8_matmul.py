"""fp8 matmuls on stored fp8 rows: the quantize/scale arithmetic, the streamer's fp8 compute, compile."""

import logging

import pytest
import torch
from test_streaming import run
from torch import nn

from qie.memory.fp8_matmul import FP8, Fp8RowLinear, compute_mode, quantize_rows, scaled_linear
from qie.memory.streaming import BlockStreamer


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_quantize_rows_scales_each_row_to_the_fp8_range():
    x = torch.randn(6, 32) * torch.logspace(-4, 3, 6)[:, None]  # rows of very different size
    x[2] = 0.0
    values, scales = quantize_rows(x)
    assert values.dtype == FP8 and scales.dtype == torch.float32 and scales.shape == (6, 1)
    assert torch.allclose(values.float().abs().amax(dim=1)[[0, 1, 3, 4, 5]], torch.tensor(448.0))
    assert torch.equal(values[2].float(), torch.zeros(32))  # an all-zero row stays zero, no NaN
    back = values.float() * scales
    assert ((back - x).abs().amax(dim=1) / x.abs().amax(dim=1).clamp(min=1e-30)).max() < 0.07


def test_scaled_linear_matches_the_float_product_within_fp8_precision():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 7, 64), torch.randn(48, 64) * 0.02, torch.randn(48)
    values, scales = quantize_rows(w)
    y = scaled_linear(x, values, scales, b)
    assert y.shape == (2, 7, 48)
    assert rel(y, x @ w.T + b) < 0.05  # e4m3 on both operands: ~2-3% relative error
    # And exactly the quantized arithmetic: dequantized operands, multiplied in float64.
    xq, xs = quantize_rows(x.reshape(-1, 64))
    exact = (xq.double() * xs.double()) @ (values.double() * scales.double()).T + b.double()
    assert rel(y.reshape(-1, 48), exact) < 1e-6
    # Scales are applied per token and per output row: scaling one token scales only its output.
    x2 = x.clone()
    x2[0, 3] *= 1000
    y2 = scaled_linear(x2, values, scales, None)
    assert rel(y2[0, 3], 1000 * (y[0, 3] - b)) < 1e-5 and torch.allclose(y2[1], y[1] - b, atol=1e-5)


def test_the_scaled_mm_call_agrees_with_the_emulation():
    """The argument layout passed to `torch._scaled_mm` (transposes, scale shapes) computes the emulated product."""
    torch.manual_seed(1)
    x, w = torch.randn(32, 64), torch.randn(48, 64)
    xq, xs = quantize_rows(x)
    wq, ws = quantize_rows(w)
    try:
        got = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"torch._scaled_mm has no kernel on this device: {exc}")
    assert rel(got, scaled_linear(x, wq, ws, None, torch.float32)) < 1e-5


def test_fp8_row_linear_keeps_its_parameters():
    lin = nn.Linear(16, 8)
    weight = lin.weight
    Fp8RowLinear.to_fp8_rows(lin)
    assert isinstance(lin, nn.Linear) and lin.weight is weight and lin.weight_scale.numel() == 0
    assert "weight_scale" not in lin.state_dict()


def test_compute_mode_picks_upcast_without_fp8_units_and_rejects_unknown_names():
    assert compute_mode(torch.device("cpu")) == "upcast"
    assert compute_mode(torch.device("cpu"), "fp8") == "fp8"
    with pytest.raises(ValueError, match="compute='int4'"):
        compute_mode(torch.device("cpu"), "int4")


class Block(nn.Module):
    """A transformer-like block: norm, MLP with a residual, called with a keyword argument."""

    def __init__(self, width):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x, gate=1.0):
        return x + gate * self.down(nn.functional.gelu(self.up(self.norm(x))))


def stack(n=6, width=64, seed=0):
    torch.manual_seed(seed)
    return nn.ModuleList(Block(width) for _ in range(n))


def fp8_reference(blocks, x):
    """The stack with every weight and every activation fed to a linear rounded through fp8 rows."""
    for block in blocks:
        for lin in (block.up, block.down):
            Fp8RowLinear.to_fp8_rows(lin)
            values, scales = quantize_rows(lin.weight.data)
            lin.weight.data, lin.weight_scale.data = values, scales
    return run(blocks, x)


@pytest.mark.parametrize("resident", [0, 2, 6])
def test_streamer_fp8_compute_runs_the_stored_rows(resident, caplog):
    x = torch.randn(2, 9, 64)
    plain = run(stack(), x)
    reference = fp8_reference(stack(), x)
    blocks = stack()
    with caplog.at_level(logging.INFO, logger="qie.memory.streaming"):
        streamer = BlockStreamer(blocks, torch.device("cpu"), resident, "fp8", torch.float32, compute="fp8")
    assert "fp8 compute" in caplog.text
    assert streamer.workspace is None  # nothing is upcast
    assert all(isinstance(b.up, Fp8RowLinear) for b in blocks)
    for _ in range(2):
        out = run(blocks, x)
        assert torch.allclose(out, reference, atol=1e-5)
    assert rel(out, plain) < 0.05
    assert all(p.numel() == 0 for p in blocks.parameters())


def test_compiled_streamed_blocks_share_one_graph_across_blocks_and_passes():
    from torch._dynamo.utils import counters

    from qie.speed.compile import compile_streamed_blocks, uncompile_blocks

    torch._dynamo.reset()
    x = torch.randn(2, 9, 64)
    blocks = stack()
    BlockStreamer(blocks, torch.device("cpu"), 2, "fp8", torch.float32, compute="fp8")
    eager = run(blocks, x)
    compile_streamed_blocks(blocks, backend="aot_eager")
    counters.clear()
    for _ in range(3):
        assert torch.allclose(run(blocks, x), eager, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1  # one graph for 6 blocks x 3 passes: no recompiles
    uncompile_blocks(blocks)
    assert "forward" not in vars(blocks[0])
