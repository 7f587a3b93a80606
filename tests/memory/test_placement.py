"""Text encoder and VAE placement: the planner's per-stage choices and carrying them out (CPU, tiny model)."""

import pytest
import torch

from qie.memory.placement import place_text_encoder, set_vae_tiling, stores_fp8
from qie.memory.plans import FULL_SIZE, pick_plan, place_stages, usable, vae_tile_within


@pytest.mark.parametrize(
    ("budget", "text_encoder", "tile"),
    [
        (24, "stream-fp8", 576),  # an RTX 4090: the largest tiles fit, the encoder does not
        (28, "stream-fp8", None),
        (32, "resident-fp8", 576),  # an RTX 5090: the encoder fits in fp8
        (40, "resident", 576),
        (48, "resident", None),
    ],
)
def test_fp8_te_stream_places_each_stage_by_budget(budget, text_encoder, tile):
    assert pick_plan(FULL_SIZE, budget).name == "fp8-te-stream"
    placed = place_stages(FULL_SIZE, budget)
    assert (placed.text_encoder, placed.vae_tile) == (text_encoder, tile)
    assert placed.peak_gib <= usable(budget)


def test_more_budget_never_places_a_stage_worse():
    order_te = ["stream-fp8", "resident-fp8", "resident"]
    order_tile = [256, 512, 576, None]
    last = (0, 0)
    for budget in range(22, 64):
        if pick_plan(FULL_SIZE, budget).name != "fp8-te-stream":
            continue
        placed = place_stages(FULL_SIZE, budget)
        assert placed.peak_gib <= usable(budget), budget
        rank = (order_te.index(placed.text_encoder), order_tile.index(placed.vae_tile))
        assert rank[0] >= last[0], budget
        last = rank


def test_without_fp8_the_streamed_encoder_stays_in_its_dtype():
    assert place_stages(FULL_SIZE, 24, fp8=False).text_encoder == "stream"


def test_vae_tile_within_room():
    assert vae_tile_within(FULL_SIZE, 100) is None
    assert vae_tile_within(FULL_SIZE, FULL_SIZE.vae_act(576)) == 576
    assert vae_tile_within(FULL_SIZE, FULL_SIZE.vae_act(576) - 0.01) == 512
    assert vae_tile_within(FULL_SIZE, 0.0) == 256


def test_vae_activations_grow_with_the_tile():
    acts = [FULL_SIZE.vae_act(t) for t in (256, 512, 576, None)]
    assert acts == sorted(acts) and len(set(acts)) == 4


@pytest.fixture(scope="module")
def tiny_pipe():
    from qie.core.models import load_pipeline

    return load_pipeline("tiny", device=torch.device("cpu"), dtype=torch.float32)


def test_set_vae_tiling_sets_the_tile_and_blend(tiny_pipe):
    vae = tiny_pipe.vae
    set_vae_tiling(vae, 576)
    assert vae.use_tiling and (vae.tile_sample_min_height, vae.tile_sample_stride_width) == (576, 512)
    set_vae_tiling(vae, None)
    assert not vae.use_tiling


def test_resident_fp8_text_encoder_is_stored_in_fp8_and_still_encodes(tiny_pipe):
    from qie.core.models import load_pipeline

    pipe = load_pipeline("tiny", device=torch.device("cpu"), dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4]])
    before = pipe.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    place_text_encoder(pipe, torch.device("cpu"), "resident-fp8")
    assert stores_fp8(pipe.text_encoder)
    after = pipe.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert after.dtype == before.dtype and torch.allclose(after, before, atol=0.1 * before.abs().max().item())
    assert not torch.equal(after, before)  # fp8 storage moves the numbers a little


def test_an_encoder_already_in_fp8_is_not_counted_at_half_again():
    from dataclasses import replace

    stored = replace(FULL_SIZE, text_encoder=FULL_SIZE.text_encoder_fp8, text_encoder_in_fp8=True)
    assert stored.text_encoder_fp8 == stored.text_encoder
    assert FULL_SIZE.text_encoder_fp8 < FULL_SIZE.text_encoder


def test_streaming_the_text_encoder_twice_changes_nothing_the_second_time():
    """An OOM step-down applies the next plan to the same pipeline: hooks and pinned copies must not double."""
    from qie.core.models import load_pipeline
    from qie.memory.placement import stream_text_encoder

    pipe = load_pipeline("tiny", device=torch.device("cpu"), dtype=torch.float32)
    cpu = torch.device("cpu")
    stream_text_encoder(pipe, cpu)
    hooks = len(pipe.text_encoder.lm_head._forward_pre_hooks)
    stream_text_encoder(pipe, cpu)
    assert hooks == 1 and len(pipe.text_encoder.lm_head._forward_pre_hooks) == hooks


@pytest.mark.parametrize("options", [{"padding_idx": 3}, {"padding_idx": -1}, {"max_norm": 1.0}, {}])
def test_host_lookup_returns_what_nn_embedding_does(options):
    """Same rows and gradients (none into the padding row) as `nn.Embedding`; the table stays on the
    host and only the rows go to the device (here "meta", which a CPU test can tell apart)."""
    import copy

    from qie.memory.placement import lookup_on_host

    torch.manual_seed(0)
    plain = torch.nn.Embedding(10, 4, **options)
    host = copy.deepcopy(plain)
    lookup_on_host(host, torch.device("cpu"))
    ids = torch.randint(0, 10, (2, 7))
    ids[0, :3] = plain.padding_idx if plain.padding_idx is not None else 0
    expected, got = plain(ids), host(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    expected.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(host.weight.grad, plain.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(host.weight, plain.weight, rtol=0, atol=0)  # max_norm renormalizes both alike

    lookup_on_host(host, torch.device("meta"))
    rows = host(ids)
    assert rows.device.type == "meta" and rows.shape == (2, 7, 4)
    assert host.weight.device.type == "cpu"


def test_streamed_text_encoder_encodes_bit_exact_without_copying_a_vocab_table(monkeypatch):
    """The streamed encoder's prompt embeddings equal the resident ones, and no vocab-sized tensor
    (the token embedding or the LM head: 1 GiB each on the real model) is copied during the encode."""
    from PIL import Image

    from qie.core import stages
    from qie.core.models import load_pipeline
    from qie.memory.placement import stream_text_encoder

    cpu = torch.device("cpu")
    pipe = load_pipeline("tiny", device=cpu, dtype=torch.float32)
    images = stages.prompt_images(pipe, [Image.new("RGB", (320, 240), (200, 50, 20))])
    with torch.inference_mode():
        resident = stages.encode_prompt(pipe, "make the sky deep blue", images, device=cpu).embeds
    stream_text_encoder(pipe, cpu)
    embed = pipe.text_encoder.get_input_embeddings()
    table = tuple(embed.weight.shape)
    copied = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        if tuple(self.shape) == table:
            copied.append(self.shape)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    with torch.inference_mode():
        streamed = stages.encode_prompt(pipe, "make the sky deep blue", images, device=cpu).embeds
    monkeypatch.undo()
    torch.testing.assert_close(streamed, resident, rtol=0, atol=0)
    assert copied == []
    assert embed.weight.device.type == "cpu"
