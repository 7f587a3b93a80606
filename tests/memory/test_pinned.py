"""`PinnedArena`: pieces of large pinned blocks instead of one rounded-up pinned allocation each."""

import pytest
import torch

from qie.memory.pinned import ALIGN, PinnedArena


def test_pieces_fill_a_block_before_a_new_one_starts():
    arena = PinnedArena(pin=False, arena_bytes=4096)
    a, b = arena.empty(1000), arena.empty(1000)
    assert arena.reserved_bytes == 4096 and arena.used_bytes == 2000
    assert b.data_ptr() - a.data_ptr() == 1024  # 1000 rounded up to the alignment
    arena.empty(3000)  # does not fit the rest: a new block
    assert arena.reserved_bytes == 8192


def test_pieces_never_overlap_and_keep_their_data():
    arena = PinnedArena(pin=False, arena_bytes=1 << 16)
    tensors = [torch.randn(n) for n in (7, 300, 5000, 1, 2048)]
    copies = [arena.copy(t) for t in tensors]
    base = copies[0].data_ptr()
    for t, c in zip(tensors, copies, strict=True):
        assert torch.equal(t, c) and (c.data_ptr() - base) % ALIGN == 0
    spans = sorted((c.data_ptr(), c.data_ptr() + c.numel() * c.element_size()) for c in copies)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:], strict=False))


def test_a_request_larger_than_a_block_gets_its_own_and_its_rest_is_used():
    arena = PinnedArena(pin=False, arena_bytes=1024)
    arena.empty(3000)  # a block of 4096
    arena.empty(1000)  # fits the rest of it
    assert arena.reserved_bytes == 4096


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float32])
def test_copy_keeps_dtype_and_shape(dtype):
    source = torch.randn(3, 5).to(dtype)
    host = PinnedArena(pin=False).copy(source)
    assert host.dtype == dtype and host.shape == (3, 5) and torch.equal(host.float(), source.float())


def test_streamed_blocks_waste_little_of_the_pinned_memory():
    """Three fp8 blocks of the full-size transformer (0.317 GiB each) per 1 GiB block: <= 1.1x the bytes."""
    block = int(0.316922 * 2**30)
    arena = PinnedArena(pin=False, arena_bytes=1 << 20)  # scaled down 1024x, same ratios
    for _ in range(41):
        arena.empty(block >> 10)
    assert arena.reserved_bytes <= 1.1 * arena.used_bytes


def test_pin_parameters_moves_weights_and_keeps_the_module_working():
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(2, 16)
    expected = layer(x)
    arena = PinnedArena(pin=False)
    moved = arena.pin_parameters(layer)
    assert moved == (16 * 8 + 8) * 4 and torch.equal(layer(x), expected)
    assert arena.used_bytes == moved


def test_a_small_piece_goes_into_an_earlier_blocks_rest():
    arena = PinnedArena(pin=False, arena_bytes=4096)
    first = arena.empty(2048)
    arena.empty(3000)  # does not fit the first block's rest: a second block
    small = arena.empty(1024)  # fits the first block's rest
    assert arena.reserved_bytes == 8192
    assert small.data_ptr() - first.data_ptr() == 2048


def test_pin_parameters_fills_rests_largest_first():
    """The streamed text encoder's pattern, scaled down: layers, then a table larger than a block, twice.

    In parameter order (the old arena) the tables' blocks and the rests before them were left
    part-empty: 11 GiB of blocks for 8.74 GiB of fp8 weights on the real encoder.
    """
    unit = ALIGN // 4  # float32 elements per alignment unit
    module = torch.nn.Module()
    sizes = [5, 9, 5, 9]  # units; the arena's blocks hold 8
    for i, n in enumerate(sizes):
        module.register_parameter(f"p{i}", torch.nn.Parameter(torch.randn(n * unit)))
    expected = {name: p.detach().clone() for name, p in module.named_parameters()}
    arena = PinnedArena(pin=False, arena_bytes=8 * ALIGN)
    arena.pin_parameters(module)
    assert arena.reserved_bytes == 32 * ALIGN  # two 16-unit blocks; parameter order took 8 + 16 + 16
    assert all(torch.equal(p, expected[name]) for name, p in module.named_parameters())
