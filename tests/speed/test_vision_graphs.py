"""The vision tower's blocks as chained CUDA-graph replays (`qie.speed.vision_graphs`)."""

import pytest
import torch
from PIL import Image

from qie.core import stages
from qie.speed import vision_attention, vision_graphs


class FakeGraph:
    """Stands in for a CUDA graph on the CPU: a replay runs the recorded function again into its outputs."""

    def __init__(self, fn, outs):
        self.fn, self.outs = fn, outs

    def replay(self):
        for out, new in zip(self.outs, self.fn(), strict=True):
            out.copy_(new)


def fake_record(fn, pool):
    out = fn()
    return FakeGraph(fn, out), out


def encode(pipe, image: Image.Image) -> torch.Tensor:
    with torch.inference_mode():
        small = stages.prompt_images(pipe, [image])
        return stages.encode_prompt(pipe, "make it blue", small, device=torch.device("cpu")).embeds


def as_on_a_gpu(graphs, monkeypatch):
    """Let `graphs` record with `fake_record` and serve CPU calls as it serves CUDA ones."""
    graphs._record = fake_record
    graphs.tower_replayable = lambda hidden: not graphs.disabled
    monkeypatch.setattr(vision_graphs, "gpu_weights", lambda model: (1,))  # weights "on the GPU"


@pytest.fixture
def graphed(tiny_editor, monkeypatch):
    """The tiny text encoder with the masked vision attention and the block graphs, as on a GPU."""
    text_encoder = tiny_editor.pipe.text_encoder
    vision_attention.install(text_encoder)
    assert vision_graphs.install(text_encoder) == len(vision_graphs._tower(text_encoder).blocks)
    graphs = vision_graphs.graphs_of(text_encoder)
    as_on_a_gpu(graphs, monkeypatch)
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


def test_a_grids_first_call_records_and_later_calls_replay_what_the_blocks_compute(
    tiny_editor, graphed, photo, monkeypatch
):
    pipe = tiny_editor.pipe
    vision_graphs.uninstall(pipe.text_encoder)  # the masked attention alone: the reference
    narrow = photo.resize((photo.width // 2, photo.height))
    want, want_narrow = encode(pipe, photo), encode(pipe, narrow)
    vision_graphs.install(pipe.text_encoder)
    graphs = vision_graphs.graphs_of(pipe.text_encoder)
    as_on_a_gpu(graphs, monkeypatch)
    results = [encode(pipe, photo) for _ in range(3)]  # eager and recorded, then replayed twice
    assert all(torch.equal(r, want) for r in results)
    assert graphs.replays == 2 and len(graphs.graphs) == 1
    (chain,) = graphs.graphs.values()
    assert len(chain.outs) == len(graphs.blocks)
    # A CUDA graph holds addresses only: the chain keeps every tensor its blocks read (boundaries, cos, sin).
    fn = chain.graph.fn
    calls = fn.__closure__[fn.__code__.co_freevars.index("calls")].cell_contents  # what the recording reads
    read = {id(cu) for cu, _ in calls} | {id(t) for _, kw in calls for t in kw["position_embeddings"]}
    assert read <= {id(t) for t in chain.inputs}
    assert torch.equal(encode(pipe, narrow), want_narrow)  # another grid: a graph of its own
    assert torch.equal(encode(pipe, narrow), want_narrow) and torch.equal(encode(pipe, photo), want)
    assert len(graphs.graphs) == 2 and graphs.replays == 4


def test_a_block_off_the_chain_runs_the_rest_of_the_pass_eagerly(tiny_editor, graphed, photo):
    """A hook on a block (something reads its output): that block and the ones after it run their own forward."""
    pipe = tiny_editor.pipe
    want = encode(pipe, photo)  # recorded
    seen = []
    handle = graphed.blocks[-1].register_forward_hook(lambda module, args, out: seen.append(out.clone()))
    try:
        got = encode(pipe, photo)
    finally:
        handle.remove()
    assert torch.equal(got, want) and graphed.replays == 1 and len(seen) == 1
    assert torch.equal(encode(pipe, photo), want) and graphed.replays == 2
    with torch.inference_mode():  # a block called outside a tower call never replays
        chain = graphed.graphs[next(iter(graphed.graphs))]
        (cu_shape, cos_shape) = chain.shapes[0]
        hidden = chain.hidden.clone()
        cu = torch.tensor([0, hidden.shape[0]], dtype=torch.int32)
        cos = torch.zeros(cos_shape)
        out = graphed.blocks[0](hidden, cu_seqlens=cu, position_embeddings=(cos, cos))
    assert graphed.replays == 2 and out.shape == hidden.shape


def test_transformers_output_capturing_hooks_stop_a_replay_only_while_they_capture(tiny_editor, graphed, photo):
    """Asking the full text encoder for hidden states leaves transformers' hooks on the vision blocks: idle
    afterwards (the graphs replay), active during such a call (the blocks run eagerly, the states are right)."""
    pipe = tiny_editor.pipe
    small = stages.prompt_images(pipe, [photo])
    text = pipe.prompt_template_encode.format(stages.IMAGE_PROMPT.format(1) + "make it blue")
    inputs = pipe.processor(text=[text], images=small, padding=True, return_tensors="pt")
    with torch.inference_mode():
        want = pipe.text_encoder(**inputs, output_hidden_states=True).hidden_states
    assert all(block._forward_hooks for block in graphed.blocks)  # left by transformers
    recorded = encode(pipe, photo)
    assert torch.equal(encode(pipe, photo), recorded) and graphed.replays == 1
    with torch.inference_mode():
        got = pipe.text_encoder(**inputs, output_hidden_states=True).hidden_states
    assert graphed.replays == 1
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


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


def test_off_cuda_or_outside_inference_mode_the_tower_does_not_replay(tiny_editor):
    text_encoder = tiny_editor.pipe.text_encoder
    vision_attention.install(text_encoder)
    vision_graphs.install(text_encoder)
    graphs = vision_graphs.graphs_of(text_encoder)
    try:
        with torch.inference_mode():
            assert not graphs.tower_replayable(torch.zeros(4, 8))  # on the CPU
        graphs.disabled = "a recording failed"
        assert not graphs.tower_replayable(torch.zeros(4, 8))
        block = graphs.blocks[0]
        pe = (torch.zeros(4, 2), torch.zeros(4, 2))
        assert graphs.block_replayable(block, torch.tensor([0, 4]), {"position_embeddings": pe, "max_seqlen": 4})
        assert not graphs.block_replayable(block, torch.tensor([0, 4]), {"position_embeddings": pe, "other": 1})
        assert not graphs.block_replayable(block, torch.tensor([0, 4]), {})
    finally:
        vision_graphs.uninstall(text_encoder)
        vision_attention.uninstall(text_encoder)


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

    replayed = [embeds(photo) for _ in range(3)]  # recorded, then replayed twice
    assert graphs.replays == 2
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
