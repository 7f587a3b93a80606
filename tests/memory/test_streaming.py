"""BlockStreamer on CPU: packing, partial residency, slot turns and recovery from an interrupted pass."""

import pytest
import torch
from torch import nn

from qie.memory.streaming import BlockLayout, BlockStreamer, Fp8Rows


def blocks(n=5, width=16, seed=0):
    torch.manual_seed(seed)
    return nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()) for _ in range(n))


def run(stack, x):
    for block in stack:
        x = block(x)
    return x


def test_layout_round_trips_plain_weights_exactly():
    block = nn.Linear(8, 4)
    layout = BlockLayout(block, "bf16", torch.float32)
    expected = [p.detach().clone() for p in block.parameters()]
    buf = layout.pack()
    assert buf.numel() == layout.nbytes and layout.work_nbytes == 0
    layout.release(torch.device("cpu"))
    assert all(p.numel() == 0 for p in block.parameters())
    layout.bind(buf, None)
    for p, e in zip(block.parameters(), expected, strict=True):
        assert torch.equal(p, e)


def test_fp8_rows_keep_each_row_within_fp8_precision():
    w = torch.randn(32, 64) * torch.logspace(-3, 2, 32)[:, None]  # rows of very different scale
    q = Fp8Rows.quantize(w).dequantize(torch.float32)
    rel = (q - w).abs().amax(dim=1) / w.abs().amax(dim=1)
    assert rel.max() < 0.07  # e4m3 keeps 3 mantissa bits: worst case 1/16 of the row's largest value


@pytest.mark.parametrize(("storage", "tol"), [("bf16", 0.0), ("fp8", 0.1)])
@pytest.mark.parametrize("resident", [0, 2, 5])
def test_streamed_blocks_compute_what_the_plain_blocks_do(storage, tol, resident):
    x = torch.randn(3, 16)
    reference = run(blocks(), x)
    stack = blocks()
    streamer = BlockStreamer(
        stack, torch.device("cpu"), resident=resident, storage=storage, compute_dtype=torch.float32
    )
    assert len(streamer.streamed) == 5 - resident
    for _ in range(3):  # passes wrap around: the first streamed block is fetched during the previous pass
        out = run(stack, x)
        assert (out - reference).abs().max().item() <= tol
    assert all(p.numel() == 0 for p in stack.parameters())  # nothing stays bound between passes


def test_a_pass_interrupted_midway_leaves_the_next_one_correct():
    x = torch.randn(3, 16)
    reference = run(blocks(), x)
    stack = blocks()
    BlockStreamer(stack, torch.device("cpu"), resident=1, storage="bf16", compute_dtype=torch.float32)

    def boom(module, args):
        raise RuntimeError("out of memory (simulated)")

    handle = stack[3].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="simulated"):
        run(stack, x)
    handle.remove()
    assert torch.equal(run(stack, x), reference)
    assert torch.equal(run(stack, x), reference)


def test_resident_blocks_are_spread_over_the_stack():
    from qie.memory.streaming import spread

    assert sorted(spread(2, 6)) == [0, 3] and spread(0, 6) == frozenset() and spread(6, 6) == frozenset(range(6))
    assert len(spread(19, 60)) == 19 and max(spread(19, 60)) < 60
    stack = blocks(6)
    streamer = BlockStreamer(stack, torch.device("cpu"), resident=2, storage="bf16", compute_dtype=torch.float32)
    assert streamer.streamed == [1, 2, 4, 5]
    assert streamer.upcoming[3] == [4, 5] and streamer.upcoming[5] == [1, 2]  # wraps to the next pass


def test_each_block_is_released_before_the_next_is_packed(monkeypatch):
    """The host holds one block's packed copy beside the plain weights at a time, not the whole stack's."""
    from qie.memory import streaming

    stack = blocks()
    seen: list[int] = []
    pack = streaming.BlockLayout.pack

    def checked_pack(layout, arena=None):
        earlier = [b for b in stack[: len(seen)]]
        assert all(p.numel() == 0 for b in earlier for p in b.parameters() if p.dim() == 2), "not released"
        seen.append(len(seen))
        return pack(layout, arena)

    monkeypatch.setattr(streaming.BlockLayout, "pack", checked_pack)
    BlockStreamer(stack, torch.device("cpu"), resident=1, storage="fp8")
    assert len(seen) == len(stack)
