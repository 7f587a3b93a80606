"""Fast mode: a LoRA in the Lightning files' format, fused exactly, and edits with the Lightning scheduler."""

import math

import pytest
import torch
from conftest import small_request
from oracle import assert_matches_reference
from safetensors.torch import load_file

from qie import Editor, InvalidRequestError
from qie.core.registry import MODELS
from qie.speed.fast_mode import load_fast_mode, lora_target_modules, random_lightning_lora
from qie.speed.options import LIGHTNING_SCHEDULER_CONFIG

LAYER = "transformer_blocks.1.img_mlp.net.2"


@pytest.fixture(scope="module")
def lora_file(tiny_editor, tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "Qwen-Image-Edit-2509-Lightning-4steps-V1.0-fp32.safetensors"
    # alpha != rank, so the alpha / rank scale is part of what is checked
    return random_lightning_lora(tiny_editor.pipe.transformer, path, rank=4, alpha=8.0, dtype=torch.float32)


def scheduler_probe(editor, seen):
    return lambda i, n: seen.append((n, editor.pipe.scheduler.config.shift_terminal))


def test_random_lora_has_the_published_key_format(tiny_editor, lora_file):
    tensors = load_file(lora_file)
    linear = lora_target_modules(tiny_editor.pipe.transformer)[LAYER]
    key = f"diffusion_model.{LAYER}"
    assert tensors[f"{key}.lora_down.weight"].shape == (4, linear.in_features)
    assert tensors[f"{key}.lora_up.weight"].shape == (linear.out_features, 4)
    assert float(tensors[f"{key}.alpha"]) == 8.0
    assert len(tensors) == 3 * len(lora_target_modules(tiny_editor.pipe.transformer))


def test_fused_lora_adds_exactly_its_delta_and_edits_in_fast_mode(tiny_editor, lora_file, photo):
    before = dict(tiny_editor.pipe.transformer.named_modules())[LAYER].weight.detach().clone()
    editor = Editor.load("tiny", fast_lora=str(lora_file.parent), fast_steps=4)  # a folder holding the file
    after = dict(editor.pipe.transformer.named_modules())[LAYER].weight.detach()
    tensors = load_file(lora_file)
    key = f"diffusion_model.{LAYER}"
    delta = (8.0 / 4) * tensors[f"{key}.lora_up.weight"] @ tensors[f"{key}.lora_down.weight"]
    torch.testing.assert_close(after, before + delta, rtol=0, atol=1e-6)
    assert not any("lora" in name for name, _ in editor.pipe.transformer.named_modules())  # unloaded

    seen = []
    result = editor.edit(small_request(photo, steps=40, true_cfg_scale=4.0), on_step=scheduler_probe(editor, seen))
    assert result.steps_run == 4 and seen[-1] == (4, None)  # 4 steps, the Lightning scheduler (no terminal shift)
    assert "fast mode: Lightning 4-step LoRA" in result.notes[0]
    assert editor.pipe.scheduler.config.shift_terminal == 0.02  # the model's own scheduler is back
    with pytest.raises(InvalidRequestError, match="^mode='quality'"):
        editor.edit(small_request(photo, mode="quality"))


@pytest.mark.slow
def test_unfused_lora_switches_per_request(tiny_editor, lora_file, photo):
    editor = Editor.load("tiny", fast_lora=str(lora_file), fast_steps=4, fast_fuse=False)
    quality = editor.edit(small_request(photo, steps=3))
    stock = tiny_editor.edit(small_request(photo, steps=3))
    assert list(quality.image.getdata()) == list(stock.image.getdata())  # adapter off: the plain model
    seen = []
    fast = editor.edit(small_request(photo, mode="fast"), on_step=scheduler_probe(editor, seen))
    assert fast.steps_run == 4 and seen[-1] == (4, None)
    # Fast mode applies to a batch as to one edit: the LoRA's steps, its scheduler, no CFG.
    seen.clear()
    batch = editor.edit_batch(
        [small_request(photo, mode="fast"), small_request(photo, mode="fast", seed=2)],
        on_step=scheduler_probe(editor, seen),
    )
    assert [r.steps_run for r in batch] == [4, 4] and seen[-1] == (4, None)
    assert batch[0].notes[0] == "batch of 2" and "fast mode" in batch[0].notes[1]
    assert_matches_reference("batching", batch[0].image, fast.image)
    # A fixed shift of 3 at any size: sigma' = 3 sigma / (1 + 2 sigma), no terminal stretch.
    sigmas = torch.linspace(1.0, 1 / 4, 4, dtype=torch.float64)
    expected = 3 * sigmas / (1 + 2 * sigmas)
    torch.testing.assert_close(editor.speed.fast.scheduler.sigmas[:-1].double(), expected, rtol=1e-5, atol=1e-6)
    assert math.isclose(LIGHTNING_SCHEDULER_CONFIG["max_shift"], math.log(3))


def test_lightning_scheduler_ignores_a_default_valued_model_config(lora_file):
    """A model scheduler whose config left the shifts at defaults (`_use_default_values` lists them):
    merging the Lightning values into that config would silently keep base_shift 0.5 / max_shift 1.15
    without dynamic shifting; the published dict, built alone, gives the fixed shift of 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from qie.core.models import load_pipeline

    pipe = load_pipeline("tiny", device=torch.device("cpu"), dtype=torch.float32)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    assert "base_shift" in pipe.scheduler.config["_use_default_values"]
    fast = load_fast_mode(pipe, str(lora_file), lightning=MODELS["2509"].lightning, steps=4)
    config = fast.scheduler.config
    assert math.isclose(config.base_shift, math.log(3)) and math.isclose(config.max_shift, math.log(3))
    assert config.use_dynamic_shifting and config.shift_terminal is None and config.time_shift_type == "exponential"
    assert {k: config[k] for k in LIGHTNING_SCHEDULER_CONFIG} == LIGHTNING_SCHEDULER_CONFIG


def test_tiny_2511_finds_the_2511_lightning_file(tiny_2511_editor, tmp_path, photo):
    name = MODELS["tiny-2511"].lightning.weight_name(4, "fp32")
    assert name.startswith("Qwen-Image-Edit-2511-Lightning-4steps")
    random_lightning_lora(tiny_2511_editor.pipe.transformer, tmp_path / name, rank=2, dtype=torch.float32)
    editor = Editor.load("tiny-2511", fast_lora=str(tmp_path), fast_steps=4)
    assert editor.speed.fast is not None and editor.speed.fast.steps == 4
    with pytest.raises(InvalidRequestError, match="^fast_steps=6"):
        Editor.load("tiny-2511", fast_lora=str(tmp_path), fast_steps=6)


def test_missing_lora_makes_fast_mode_unavailable_not_the_editor(photo, caplog):
    editor = Editor.load("tiny", fast_lora="/nonexistent/lightning.safetensors")
    assert "fast mode unavailable" in caplog.text
    result = editor.edit(small_request(photo, steps=2, mode="fast"))
    assert result.steps_run == 2
    assert result.notes[0].startswith("fast mode unavailable: LoRA not found")


def test_random_lora_for_the_full_size_transformer_converts_like_the_published_files(tmp_path):
    """The benchmark helper works on the full-size transformer built on the meta device (shapes only)."""
    from diffusers import QwenImageEditPlusPipeline, QwenImageTransformer2DModel

    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel()  # the class defaults are the real 60-block config
    n_layers = len(lora_target_modules(transformer))
    assert n_layers == 60 * 12  # per block: 8 attention projections, 2 x 2 MLP layers
    path = random_lightning_lora(transformer, tmp_path / "full.safetensors", rank=1)
    converted = QwenImageEditPlusPipeline.lora_state_dict(str(path))
    assert len(converted) == 2 * n_layers
    assert converted["transformer.transformer_blocks.59.img_mlp.net.2.lora_B.weight"].shape == (3072, 1)
