"""The text encoder's language model as CUDA-graph replays at padded prompt lengths (`qie.speed.text_graphs`)."""

import pytest
import torch
from conftest import small_request
from oracle import assert_installed_option_within

from qie.speed import text_graphs


@pytest.fixture
def language_model(tiny_editor):
    return tiny_editor.pipe.text_encoder.model.language_model


def _inputs(model, length: int, seed: int = 0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, length, model.config.hidden_size, generator=gen).to(device, model.dtype)
    positions = torch.randint(0, 3 * length, (3, 1, length), generator=gen).to(device)
    return embeds, positions


def test_the_recorded_body_is_the_forward(language_model):
    """What the graph records (`run_layers`) is what transformers' forward computes for the same call."""
    embeds, positions = _inputs(language_model, 37)
    with torch.inference_mode():
        forward = language_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
        assert torch.equal(text_graphs.run_layers(language_model, embeds, positions), forward)
        plain = language_model(inputs_embeds=embeds).last_hidden_state  # no positions: 0..L-1
        default = text_graphs.default_positions(37, embeds.device)
        assert torch.equal(text_graphs.run_layers(language_model, embeds, default), plain)


def test_padding_at_the_end_leaves_the_prompt_tokens_alone(language_model):
    """Causal attention: the padded tokens come after every prompt token, which never attend to them."""
    embeds, positions = _inputs(language_model, 37)
    padded = text_graphs.bucket(37)
    noise = torch.randn(1, padded - 37, embeds.shape[-1]) * 100  # whatever the buffer held before
    with torch.inference_mode():
        plain = text_graphs.run_layers(language_model, embeds, positions)
        both = text_graphs.run_layers(
            language_model,
            torch.cat([embeds, noise], dim=1),
            torch.cat([positions, torch.zeros(3, 1, padded - 37, dtype=positions.dtype)], dim=2),
        )
    torch.testing.assert_close(both[:, :37], plain, rtol=1e-5, atol=1e-5)


def test_install_changes_the_language_model_only_and_uninstall_restores_it(tiny_editor):
    text_encoder = tiny_editor.pipe.text_encoder
    model = text_encoder.model.language_model
    try:
        assert text_graphs.install(text_encoder) == 1 and text_graphs.install(text_encoder) == 0
        graphs = text_graphs.graphs_of(text_encoder)
        assert graphs.model is model and model.forward == graphs.forward and graphs.graphs == {}
        assert sum(hasattr(m, "_qie_text_graphs") for m in text_encoder.modules()) == 1
    finally:
        text_graphs.uninstall(text_encoder)
    assert "forward" not in model.__dict__ and text_graphs.graphs_of(text_encoder) is None


def test_calls_a_graph_cannot_replay_run_transformers_forward(tiny_editor, language_model):
    """Off CUDA, with a mask, or asking for per-layer outputs: the forward is transformers' own."""
    embeds, positions = _inputs(language_model, 20)
    with torch.inference_mode():
        want = language_model(inputs_embeds=embeds, position_ids=positions, output_hidden_states=True)
    text_graphs.install(tiny_editor.pipe.text_encoder)
    try:
        with torch.inference_mode():
            got = language_model(inputs_embeds=embeds, position_ids=positions, output_hidden_states=True)
            graphs = text_graphs.graphs_of(tiny_editor.pipe.text_encoder)
            assert not graphs.replayable(None, None, positions, None, embeds, None, {})  # CPU
        assert len(got.hidden_states) == len(want.hidden_states) == len(language_model.layers) + 1
        assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, want.hidden_states, strict=True))
        assert torch.equal(got.last_hidden_state, want.last_hidden_state) and graphs.graphs == {}
    finally:
        text_graphs.uninstall(tiny_editor.pipe.text_encoder)


def test_a_graph_that_cannot_be_recorded_turns_the_graphs_off_and_runs_eager(
    tiny_editor, language_model, caplog, monkeypatch
):
    embeds, positions = _inputs(language_model, 20)
    with torch.inference_mode():
        want = language_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
    text_graphs.install(tiny_editor.pipe.text_encoder)
    graphs = text_graphs.graphs_of(tiny_editor.pipe.text_encoder)

    def fail(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs.replayable = lambda *args: not graphs.disabled  # as on a GPU
    monkeypatch.setattr(text_graphs, "gpu_weights", lambda model: (1,))  # weights "on the GPU"
    graphs._record = fail
    try:
        with torch.inference_mode():
            got = language_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
            again = language_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
        assert torch.equal(got, want) and torch.equal(again, want) and graphs.disabled
        assert [r.message for r in caplog.records].count(
            "text encoder: CUDA graphs off (RuntimeError: operation not permitted when stream is capturing); "
            "running eager"
        ) == 1
    finally:
        text_graphs.uninstall(tiny_editor.pipe.text_encoder)


def test_only_causal_sdpa_text_models_are_eligible(language_model):
    assert text_graphs._eligible(language_model)
    config = language_model.config
    before = config._attn_implementation
    try:
        config._attn_implementation = "eager"
        assert not text_graphs._eligible(language_model)
    finally:
        config._attn_implementation = before
    config.layer_types = ["sliding_attention", *config.layer_types[1:]]
    try:
        assert not text_graphs._eligible(language_model)
    finally:
        config.layer_types = ["full_attention"] * len(config.layer_types)


# --- on a GPU ------------------------------------------------------------------------------------------------


def _close(dtype: torch.dtype) -> dict[str, float]:
    """Matrix products of another height round differently: a few units in the last place."""
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}


@pytest.fixture(scope="module")
def cuda_editor():
    from qie import Editor

    return Editor.load("tiny", device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_a_replay_equals_the_forward_and_one_graph_serves_a_bucket(cuda_editor):
    text_encoder = cuda_editor.pipe.text_encoder
    model = text_encoder.model.language_model
    graphs = text_graphs.graphs_of(text_encoder)  # installed at load on CUDA
    graphs.graphs.clear()
    for length, seed in ((37, 0), (50, 1), (37, 2)):
        embeds, positions = _inputs(model, length, seed, device="cuda")
        with torch.inference_mode():
            got = model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
            want = text_graphs.run_layers(model, embeds, positions)
        torch.testing.assert_close(got.float(), want.float(), **_close(model.dtype))
    assert list(graphs.graphs) == [(64, model.config.hidden_size, model.dtype, embeds.device)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_new_weights_record_new_graphs(cuda_editor):
    model = cuda_editor.pipe.text_encoder.model.language_model
    graphs = text_graphs.graphs_of(cuda_editor.pipe.text_encoder)
    embeds, positions = _inputs(model, 30, device="cuda")
    with torch.inference_mode():
        model(inputs_embeds=embeds, position_ids=positions)
        before = graphs.graphs[(64, model.config.hidden_size, model.dtype, embeds.device)]
        layer = model.layers[0].mlp.down_proj
        old = layer.weight
        layer.weight = torch.nn.Parameter(old.detach() * 2, requires_grad=False)
        try:
            got = model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
            want = text_graphs.run_layers(model, embeds, positions)
            after = graphs.graphs[(64, model.config.hidden_size, model.dtype, embeds.device)]
        finally:
            layer.weight = old
    assert after is not before
    torch.testing.assert_close(got.float(), want.float(), **_close(model.dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_edit_stays_within_its_tolerance(cuda_editor, photo):
    text_encoder = cuda_editor.pipe.text_encoder
    text_graphs.uninstall(text_encoder)
    try:
        assert_installed_option_within(
            "text-graphs",
            cuda_editor,
            small_request(photo, seed=4, steps=2),
            text_encoder,
            text_graphs.install,
            text_graphs.uninstall,
        )
    finally:
        text_graphs.install(text_encoder)
