"""BlockStreamer and per-call onloading on a CUDA GPU: copy stream, events, slots. Not run in CI."""

import pytest
import torch
from test_streaming import blocks, run
from torch import nn

from qie.memory.placement import onload_per_call
from qie.memory.streaming import BlockStreamer, Fp8Rows

pytestmark = pytest.mark.gpu

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def fp8_rounded(stack):
    """The same blocks with every 2-D weight rounded through fp8 rows, as the streamer stores them."""
    with torch.no_grad():
        for p in stack.parameters():
            if p.dim() == 2:
                p.copy_(Fp8Rows.quantize(p).dequantize(p.dtype))
    return stack


@cuda
@pytest.mark.parametrize(("storage", "tol"), [("bf16", 0.0), ("fp8", 1e-4)])
@pytest.mark.parametrize("resident", [0, 3])
def test_streamed_blocks_on_the_gpu_match_resident_ones(storage, tol, resident):
    dev = torch.device("cuda")
    x = torch.randn(64, 256, device=dev)
    plain = blocks(12, 256)
    reference = run((fp8_rounded(plain) if storage == "fp8" else plain).to(dev), x)
    stack = blocks(12, 256)
    streamer = BlockStreamer(
        stack, dev, resident=resident, storage=storage, compute_dtype=torch.float32, compute="upcast"
    )
    before = torch.cuda.memory_allocated()
    for _ in range(4):  # the copy of block k+1 overlaps block k; a pass prefetches the next pass's first block
        out = run(stack, x)
        torch.cuda.synchronize()
        assert (out - reference).abs().max().item() <= tol
    assert torch.cuda.memory_allocated() <= before + 4 * 2**20  # no per-pass allocations survive
    assert streamer.copy_stream is not None


@cuda
def test_onload_per_call_holds_the_weights_on_the_gpu_only_during_the_call():
    dev = torch.device("cuda")
    layer = nn.Linear(1024, 1024)
    x = torch.randn(4, 1024, device=dev)
    expected = layer.to(dev)(x)
    onload_per_call(layer, dev)
    assert layer.weight.device.type == "cpu" and layer.weight.is_pinned()
    base = torch.cuda.memory_allocated()
    assert torch.equal(layer(x), expected)
    torch.cuda.synchronize()
    assert layer.weight.device.type == "cpu"
    assert torch.cuda.memory_allocated() <= base + 64 * 1024


@cuda
@pytest.mark.parametrize("rows", [1, 2, 77])
def test_scaled_mm_on_the_gpu_matches_the_emulation(rows):
    from qie.memory.fp8_matmul import quantize_rows, scaled_linear

    x, w, b = torch.randn(rows, 512), torch.randn(384, 512) * 0.02, torch.randn(384)
    values, scales = quantize_rows(w)
    expected = scaled_linear(x, values, scales, b)  # float32 emulation on the CPU
    dev = torch.device("cuda")
    got = scaled_linear(x.to(dev, torch.bfloat16), values.to(dev), scales.to(dev), b.to(dev, torch.bfloat16))
    assert got.dtype == torch.bfloat16
    rel = (got.float().cpu() - expected).norm() / expected.norm()
    assert rel < 2e-2  # bf16 inputs and output


@cuda
def test_fp8_compute_compiles_once_for_all_streamed_blocks_and_passes():
    from test_fp8_matmul import fp8_reference, stack
    from torch._dynamo.utils import counters

    from qie.memory.fp8_matmul import Fp8RowLinear
    from qie.speed.compile import compile_streamed_blocks

    dev = torch.device("cuda")
    torch._dynamo.reset()
    x = torch.randn(2, 64, 256)
    reference = fp8_reference(stack(8, 256), x)  # float32 emulation on the CPU
    blocks = stack(8, 256).to(torch.bfloat16)
    streamer = BlockStreamer(blocks, dev, resident=3, storage="fp8", compute_dtype=torch.bfloat16)
    assert streamer.compute == "fp8" and isinstance(blocks[0].up, Fp8RowLinear)
    compile_streamed_blocks(blocks)
    counters.clear()
    xg = x.to(dev, torch.bfloat16)
    for _ in range(3):
        out = run(blocks, xg)
        torch.cuda.synchronize()
        rel = (out.float().cpu() - reference).norm() / reference.norm()
        assert rel < 3e-2
    assert counters["stats"]["unique_graphs"] == 1  # 8 blocks (3 resident, 5 streamed) x 3 passes


@cuda
def test_streamed_blocks_and_the_text_encoder_sit_in_pinned_memory_without_rounding_up():
    """Pinned memory for the streamed blocks <= 1.1x their bytes; every text-encoder weight pinned."""
    from qie.core.models import load_pipeline
    from qie.memory.placement import stream_text_encoder
    from qie.memory.streaming import BlockStreamer

    dev = torch.device("cuda")
    pipe = load_pipeline("tiny", device=dev, dtype=torch.bfloat16)
    streamer = BlockStreamer(pipe.transformer.transformer_blocks, dev, resident=0, storage="fp8")
    assert all(streamer.buffers[i].is_pinned() for i in streamer.streamed)
    assert streamer.host_bytes() <= streamer.pinned_bytes()
    stream_text_encoder(pipe, dev, fp8=True)
    assert all(p.data.is_pinned() for p in pipe.text_encoder.parameters() if p.device.type == "cpu")
