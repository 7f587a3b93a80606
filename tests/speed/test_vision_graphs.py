"""The vision tower's blocks as chained CUDA-graph replays (`qie.speed.vision_graphs`)."""

import pytest
import torch
from PIL import Image

from qie.core import stages
from qie.speed import vision_attention, vision_graphs


class FakeGraph:
    """Stands in for a CUDA graph on the CPU: a replay runs the recorded function again into its output."""

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        self.out.copy_(self.fn())


def fake_record(fn, pool):
    out = fn()
    return FakeGraph(fn, out), out


def encode(pipe, image: Image.Image) -> torch.Tensor:
    with torch.inference_mode():
        small = stages.prompt_images(pipe, [image])
        return stages.encode_prompt(pipe, "make it blue", small, device=torch.device("cpu")).embeds


@pytest.fixture
def graphed(tiny_editor):
    """The tiny text encoder with the masked vision attention and the block graphs, recorded by `fake_record`
    and replayable as on a GPU."""
    text_encoder = tiny_editor.pipe.text_encoder
    vision_attention.install(text_encoder)
    assert vision_graphs.install(text_encoder) == len(vision_graphs._tower(text_encoder).blocks)
    graphs = vision_graphs.graphs_of(text_encoder)
    graphs._record = fake_record
    graphs.replayable = lambda *args: not graphs.disabled
    try:
        yield graphs
    finally:
        vision_graphs.uninstall(text_encoder)
        vision_attention.uninstall(text_encoder)


def test_install_sets_each_blocks_forward_and_uninstall_restores_them(tiny_editor):
    text_encoder = tiny_editor.pipe.text_encoder
    tower = vision_graphs._tower(text_encoder)
    assert tower is text_encoder.model.visual
    try:
        assert vision_graphs.install(text_encoder) == len(tower.blocks) > 0
        assert vision_graphs.install(text_encoder) == 0
        assert all("forward" in block.__dict__ for block in tower.blocks)
    finally:
        vision_graphs.uninstall(text_encoder)
    assert not any("forward" in block.__dict__ for block in tower.blocks)
    assert vision_graphs.graphs_of(text_encoder) is None


def test_off_cuda_the_blocks_run_their_own_forward(tiny_editor, photo):
    want = encode(tiny_editor.pipe, photo)
    vision_graphs.install(tiny_editor.pipe.text_encoder)
    try:
        got = encode(tiny_editor.pipe, photo)
        graphs = vision_graphs.graphs_of(tiny_editor.pipe.text_encoder)
        assert graphs.replays == 0 and not graphs.graphs
    finally:
        vision_graphs.uninstall(tiny_editor.pipe.text_encoder)
    assert torch.equal(got, want)


def test_the_graphs_chain_through_their_buffers_and_replay_what_the_blocks_compute(tiny_editor, graphed, photo):
    pipe = tiny_editor.pipe
    vision_graphs.uninstall(pipe.text_encoder)  # the masked attention alone: the reference
    want = encode(pipe, photo)
    vision_graphs.install(pipe.text_encoder)
    graphs = vision_graphs.graphs_of(pipe.text_encoder)
    graphs._record, graphs.replayable = fake_record, (lambda *args: not graphs.disabled)
    blocks = len(graphs.blocks)
    first = encode(pipe, photo)  # records every block's graph, then replays it
    second = encode(pipe, photo)
    assert torch.equal(first, want) and torch.equal(second, want)
    assert graphs.replays == 2 * blocks
    (chain,) = graphs.graphs.values()
    ordered = [graph for (index, _), graph in sorted(chain.items())]
    assert len(ordered) == blocks
    assert all(later.hidden is earlier.out for earlier, later in zip(ordered, ordered[1:], strict=False))
    other = encode(pipe, photo.resize((photo.width // 2, photo.height)))  # another patch count: graphs of its own
    assert len(graphs.graphs) == 2 and graphs.replays == 3 * blocks
    vision_graphs.uninstall(pipe.text_encoder)
    assert torch.equal(other, encode(pipe, photo.resize((photo.width // 2, photo.height))))


def test_a_recording_that_fails_turns_the_graphs_off_and_runs_eager(tiny_editor, graphed, photo, caplog):
    pipe = tiny_editor.pipe

    def fail(fn, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphed._record = fail
    got, again = encode(pipe, photo), encode(pipe, photo)
    assert graphed.disabled and graphed.replays == 0 and not graphed.graphs
    assert [r.message for r in caplog.records].count(
        "vision tower: CUDA graphs off (RuntimeError: operation not permitted when stream is capturing); running eager"
    ) == 1
    vision_graphs.uninstall(pipe.text_encoder)
    assert torch.equal(got, encode(pipe, photo)) and torch.equal(again, got)


def test_calls_off_cuda_or_outside_inference_mode_do_not_replay(tiny_editor):
    text_encoder = tiny_editor.pipe.text_encoder
    vision_graphs.install(text_encoder)
    graphs = vision_graphs.graphs_of(text_encoder)
    hidden, cu = torch.zeros(4, 8), torch.tensor([0, 4])
    kwargs = {"position_embeddings": (torch.zeros(4, 2), torch.zeros(4, 2))}
    try:
        with torch.inference_mode():
            assert not graphs.replayable(graphs.blocks[0], 0, hidden, cu, kwargs)  # on the CPU
        graphs.disabled = "a recording failed"
        assert not graphs.replayable(graphs.blocks[0], 0, hidden, cu, kwargs)
    finally:
        vision_graphs.uninstall(text_encoder)


# --- on a GPU ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_replayed_blocks_equal_the_eager_ones_bit_for_bit(photo):
    from qie import Editor

    editor = Editor.load("tiny", device="cuda")
    pipe, device = editor.pipe, torch.device("cuda")
    graphs = vision_graphs.graphs_of(pipe.text_encoder)  # installed at load on CUDA
    assert graphs is not None

    def embeds(image):
        with torch.inference_mode():
            small = stages.prompt_images(pipe, [image])
            return stages.encode_prompt(pipe, "make it blue", small, device=device).embeds

    replayed = [embeds(photo) for _ in range(3)]
    assert graphs.replays == 3 * len(graphs.blocks)
    vision_graphs.uninstall(pipe.text_encoder)
    eager = embeds(photo)
    assert all(torch.equal(r, eager) for r in replayed)
    vision_graphs.install(pipe.text_encoder)
    graphs = vision_graphs.graphs_of(pipe.text_encoder)
    block = graphs.blocks[0]
    handle = block.register_forward_hook(lambda *args: None)
    try:
        assert torch.equal(embeds(photo), eager) and graphs.replays == 0  # a hook on a block: eager
    finally:
        handle.remove()
