"""Compile options on CPU: the mode reaches torch.compile, bad modes are refused, load options are wired."""

import pytest
import torch

from qie import Editor, InvalidRequestError
from qie.core.load_options import LoadOptions
from qie.speed.compile import (
    compile_blocks,
    compile_vae,
    inductor_options,
    uncompile_blocks,
    uncompile_vae,
)
from qie.speed.options import COMPILE_MODES


@pytest.fixture()
def transformer(tiny_editor):
    """A fresh transformer of the tiny config (compiling the shared one would leak into other tests)."""
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_config(tiny_editor.pipe.transformer.config)


@pytest.mark.parametrize("mode", COMPILE_MODES)
def test_the_compile_mode_reaches_torch_compile(transformer, tmp_path, mode):
    assert compile_blocks(transformer, cache_dir=tmp_path, mode=mode)
    try:
        expected = torch._inductor.list_mode_options(mode)  # what torch.compile(mode=...) turns into
        for block in transformer.transformer_blocks:
            assert inductor_options(block) == expected
        assert inductor_options(transformer) is None  # regional: only the repeated blocks
        graphs = getattr(transformer, "_qie_graph_step", None) is not None
        assert graphs == (mode in ("reduce-overhead", "max-autotune"))  # a CUDA-graph step per transformer call
    finally:
        uncompile_blocks(transformer)
    assert all(inductor_options(b) is None for b in transformer.transformer_blocks)
    assert getattr(transformer, "_qie_graph_step", None) is None


@pytest.mark.parametrize("mode", COMPILE_MODES)
def test_quantized_blocks_get_the_quantizer_inductor_options_in_their_own_compile(transformer, tmp_path, mode):
    """torchao would set them process-wide; `quantize_transformer` records them for the blocks' compile only."""
    from qie.memory.quantize import QUANTIZED_INDUCTOR_OPTIONS

    transformer._qie_inductor_options = dict(QUANTIZED_INDUCTOR_OPTIONS)  # as quantize_transformer does
    before = torch._inductor.config.coordinate_descent_tuning
    assert compile_blocks(transformer, cache_dir=tmp_path, mode=mode)
    try:
        expected = {**torch._inductor.list_mode_options(mode), **QUANTIZED_INDUCTOR_OPTIONS}
        assert all(inductor_options(block) == expected for block in transformer.transformer_blocks)
        assert torch._inductor.config.coordinate_descent_tuning == before  # nothing process-wide
        if mode == "default":  # torchao's coordinate descent: 129 s more compile, no faster forward (h200-am)
            assert not any(
                inductor_options(block).get("coordinate_descent_tuning") for block in transformer.transformer_blocks
            )
    finally:
        uncompile_blocks(transformer)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_quantizing_leaves_the_process_inductor_settings_alone(transformer):
    from qie.memory.quantize import QUANTIZED_INDUCTOR_OPTIONS, quantize_transformer

    before = (torch._inductor.config.coordinate_descent_tuning, torch._inductor.config.force_fuse_int_mm_with_mul)
    quantize_transformer(transformer.to("cuda", torch.bfloat16), torch.device("cuda"))
    after = (torch._inductor.config.coordinate_descent_tuning, torch._inductor.config.force_fuse_int_mm_with_mul)
    assert after == before and transformer._qie_inductor_options == QUANTIZED_INDUCTOR_OPTIONS


def test_an_unknown_compile_mode_is_refused_by_name(transformer, tmp_path):
    with pytest.raises(InvalidRequestError, match="^compile_mode='turbo'"):
        compile_blocks(transformer, cache_dir=tmp_path, mode="turbo")
    assert inductor_options(transformer.transformer_blocks[0]) is None
    with pytest.raises(InvalidRequestError, match="^compile_mode='turbo'"):
        Editor.load("tiny", compile=True, compile_mode="turbo")  # checked before anything loads


def test_vae_compile_and_channels_last(tiny_editor):
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage.from_config(tiny_editor.pipe.vae.config)
    parts = (vae.decoder, vae.encoder)
    convs = [m for part in parts for m in part.modules() if isinstance(m, torch.nn.Conv3d)]
    assert not compile_vae(vae, "off") and all(inductor_options(part) is None for part in parts)
    assert compile_vae(vae, "channels-last")
    assert all(inductor_options(part) == {} for part in parts)
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last_3d) for c in convs)
    with pytest.raises(InvalidRequestError, match="^vae_compile='yes'"):
        compile_vae(vae, "yes")
    with pytest.raises(InvalidRequestError, match="^vae_compile='auto'"):  # Editor.load decides what auto means
        compile_vae(vae, "auto")
    uncompile_vae(vae)
    assert all(inductor_options(part) is None for part in parts)


def test_load_options_apply_the_text_encoder_fp8_and_vae_compile():
    editor = Editor.load(LoadOptions(model="tiny", text_encoder_fp8=True, vae_compile="on"))
    te = editor.pipe.text_encoder
    stored = {n for n, p in te.named_parameters() if p.dtype == torch.float8_e4m3fn}
    linears = {f"{n}.weight" for n, m in te.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    assert linears <= stored  # every Linear weight but the LM head's
    assert not any("embed" in n for n in stored)
    assert inductor_options(editor.pipe.vae.decoder) == {} and inductor_options(editor.pipe.vae.encoder) == {}


@pytest.mark.parametrize(
    ("options", "at_load", "with_compile"),
    [({}, False, None), ({"compile": True}, False, "on"), ({"compile": True, "vae_compile": "off"}, False, "off")]
    + [({"vae_compile": "on"}, True, None), ({"compile": True, "vae_compile": "channels-last"}, True, "off")],
)
def test_vae_compile_auto_follows_the_transformer_compile(monkeypatch, options, at_load, with_compile):
    """ "auto" (the default) compiles the VAE in `enable_compile`, so only with `compile=True`;
    "on" and "channels-last" compile it at load whatever `compile` says."""
    calls = []
    monkeypatch.setattr(Editor, "enable_compile", lambda self, **kwargs: calls.append(kwargs["vae_compile"]) or False)
    editor = Editor.load(LoadOptions(model="tiny", **options))
    assert (inductor_options(editor.pipe.vae.decoder) is not None) == at_load
    assert calls == ([with_compile] if with_compile else [])


def test_vae_compile_auto_compiles_the_vae_only_on_the_resident_plans():
    """Measured there (untiled VAE, no budget); under a budget plan the VAE may be tiled, its memory not measured."""
    from qie.core.load_options import PLAN_NAMES, auto_vae_compile
    from qie.speed.options import VAE_COMPILE_MODES

    chosen = {plan for plan in PLAN_NAMES if auto_vae_compile("auto", plan) == "on"}
    assert chosen == {"resident", "resident-fp8"}
    others = [mode for mode in VAE_COMPILE_MODES if mode != "auto"]  # at load, or never: nothing in enable_compile
    assert all(auto_vae_compile(mode, plan) == "off" for mode in others for plan in PLAN_NAMES)


def test_enable_compile_compiles_the_vae_before_its_warm_up_and_undoes_it_on_failure(monkeypatch):
    import qie.speed.compile

    editor = Editor.load("tiny")
    monkeypatch.setattr(qie.speed.compile, "compile_blocks", lambda transformer, mode: True)
    monkeypatch.setattr(editor, "device", torch.device("cuda"))  # enable_compile's gate; nothing runs on it here
    seen = []
    vae = editor.pipe.vae
    monkeypatch.setattr(
        editor, "warm_up", lambda size: seen.append((inductor_options(vae.decoder), inductor_options(vae.encoder)))
    )
    assert editor.enable_compile(vae_compile="on")
    assert seen == [({}, {})]  # compiled when the warm-up ran, so its compile is part of the warm-up
    uncompile_vae(editor.pipe.vae)
    with pytest.raises(InvalidRequestError, match="^vae_compile='auto'"):  # before anything compiles
        editor.enable_compile(vae_compile="auto")
    assert inductor_options(editor.pipe.vae.decoder) is None

    def failing(size):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(editor, "warm_up", failing)
    assert not editor.enable_compile(vae_compile="on")
    assert inductor_options(editor.pipe.vae.decoder) is None and inductor_options(editor.pipe.vae.encoder) is None


@pytest.mark.parametrize("setup", ["batched", "streamed-batched", "fast"])
def test_after_the_warm_up_no_edit_compiles_again(setup, tmp_path):
    """Batched CFG (the stream plan's default on a GPU) and fast mode make calls of one prompt length
    each; the warm-up traces them at two, so later prompts reuse the graphs; and at two output sizes,
    so other sizes do too. Before, the first real edit with another prompt length or size recompiled."""
    import torch
    from PIL import Image
    from torch._dynamo.utils import counters

    from qie.core.editor import Editor
    from qie.core.request import EditRequest
    from qie.memory.streaming import BlockStreamer
    from qie.speed.compile import compile_streamed_blocks, mark_token_dims, uncompile_blocks
    from qie.speed.fast_mode import random_lightning_lora

    editor = Editor.load("tiny")
    if setup == "fast":
        lora = random_lightning_lora(editor.pipe.transformer, tmp_path / "lightning.safetensors", dtype=torch.float32)
        editor = Editor.load("tiny", fast_lora=str(lora))
    blocks = editor.pipe.transformer.transformer_blocks
    torch._dynamo.reset()
    mark_token_dims(editor.pipe.transformer)  # as compile_blocks does
    if setup == "streamed-batched":
        BlockStreamer(blocks, torch.device("cpu"), resident=1, storage="fp8", compute_dtype=torch.float32)
        compile_streamed_blocks(blocks, backend="eager")
    else:
        editor.pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    editor._batch_cfg_pays = setup != "fast"  # what the cost model says for the stream plan on a GPU
    try:
        editor.warm_up(256)
        traced = counters["stats"]["unique_graphs"]
        photo = Image.new("RGB", (256, 256), (30, 60, 90))
        prompts = ("replace the background with pure white and add a red price tag", "remove the watermark")
        for prompt, (width, height) in zip(prompts * 2, [(256, 256), (256, 256), (192, 256), (256, 128)], strict=True):
            for batch_cfg in (None, False):
                size = {"width": width, "height": height}
                editor.edit(EditRequest(images=[photo], prompt=prompt, steps=2, batch_cfg=batch_cfg, **size))
        assert counters["stats"]["unique_graphs"] == traced
    finally:
        uncompile_blocks(editor.pipe.transformer)


@pytest.mark.parametrize("variant", ["tiny", "tiny-2511"])
def test_the_warm_up_traces_one_graph_per_batch_size(variant, caplog):
    """Blocks traced dynamic in the token counts from the first call: batch 1 and batch 2 are the only
    graphs. Unmarked: 5 graphs (2511 with its hooks but not its modulation index: 4)."""
    from torch._dynamo.utils import counters

    from qie.speed.compile import MODULATE_INDEX, mark_token_dims, uncompile_blocks

    editor = Editor.load(variant)
    transformer = editor.pipe.transformer
    torch._dynamo.reset()
    counters.clear()
    assert mark_token_dims(transformer) and mark_token_dims(transformer)  # idempotent
    assert len(transformer._qie_token_dims) == 4
    transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    editor._batch_cfg_pays = True  # batched CFG (batch 2) and fast mode's batch-1 calls
    try:
        with caplog.at_level("INFO", logger="qie.core.editor"):
            editor.warm_up(256)
        assert counters["stats"]["unique_graphs"] == 2
        assert (MODULATE_INDEX in torch.compiler.config.dynamic_sources) == (variant == "tiny-2511")
    finally:
        uncompile_blocks(transformer)
    assert transformer._qie_token_dims is None and MODULATE_INDEX not in torch.compiler.config.dynamic_sources
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compile warm-up")]
    assert [p.split(":")[0] for p in progress] == [f"compile warm-up {i}/5" for i in range(1, 6)]
    assert "at 256²" in progress[0] and "at 128²" in progress[-1]


def test_token_dim_marks_change_no_arithmetic(photo):
    """The hooks only mark tensors (and hand the mask over as the bool the transformer makes of it)."""
    from qie.core.request import EditRequest
    from qie.speed.compile import mark_token_dims, unmark_token_dims

    editor = Editor.load("tiny")
    request = EditRequest(images=[photo], prompt="make the background white", steps=2, width=128, height=128)
    editor._batch_cfg_pays = True  # the padded prompt mask reaches the transformer
    plain = editor.edit(request).image
    transformer = editor.pipe.transformer
    mark_token_dims(transformer)
    seen = []  # the mask as the transformer receives it, after the marking hook
    spy = transformer.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs["encoder_hidden_states_mask"]), with_kwargs=True
    )
    try:
        marked = editor.edit(request).image
    finally:
        spy.remove()
        unmark_token_dims(transformer)
    assert seen and all(m is not None and m.dtype == torch.bool for m in seen)
    assert all(1 in getattr(m, "_dynamo_weak_dynamic_indices", ()) for m in seen)
    assert list(plain.getdata()) == list(marked.getdata())
