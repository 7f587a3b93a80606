"""User LoRAs: parsing, the three key formats fused exactly, clear errors, notes, and the stream plan."""

import pytest
import torch
from conftest import small_request
from lora_files import FORMATS, write_lora
from safetensors.torch import save_file

from qie import Editor, InvalidRequestError, ModelLoadError
from qie.core.loras import LoraSpec

LAYER = "transformer_blocks.1.img_mlp.net.2"


@pytest.mark.parametrize(
    ("text", "source", "scale"),
    [
        ("styles/ink.safetensors:0.8", "styles/ink.safetensors", 0.8),
        ("owner/ink-lora", "owner/ink-lora", 1.0),
        ("owner/ink-lora:-0.5", "owner/ink-lora", -0.5),
        ("C:/loras/ink.safetensors", "C:/loras/ink.safetensors", 1.0),  # a colon that is part of the path
    ],
)
def test_parse_path_or_repo_and_scale(text, source, scale):
    assert LoraSpec.parse(text) == LoraSpec(source, scale)


def test_a_scale_out_of_range_is_refused():
    with pytest.raises(InvalidRequestError, match="^lora='ink.safetensors:50.0'.*from -10 to 10"):
        LoraSpec.parse("ink.safetensors:50")


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_key_format_is_fused_exactly_at_its_scale(tiny_editor, tmp_path, fmt):
    path = tmp_path / f"{fmt}.safetensors"
    deltas = write_lora(tiny_editor.pipe.transformer, path, fmt)
    editor = Editor.load("tiny", loras=[f"{path}:0.5"])
    modules = dict(editor.pipe.transformer.named_modules())
    before = dict(tiny_editor.pipe.transformer.named_modules())
    for name in (LAYER, "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.img_mod.1"):
        expected = before[name].weight + 0.5 * deltas[name]
        torch.testing.assert_close(modules[name].weight, expected, rtol=0, atol=1e-5)
    assert not any("lora" in name for name in modules)  # fused, then unloaded: plain Linear layers
    assert editor.loras == (LoraSpec(str(path), 0.5),)


def test_a_lora_for_another_model_names_its_first_mismatching_key(tmp_path):
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        full = QwenImageTransformer2DModel(num_layers=1)  # the full-size widths
    path = tmp_path / "full-size.safetensors"
    write_lora(full, path, "kohya", rank=1, std=0.0)
    with pytest.raises(ModelLoadError, match=r"is not a LoRA for this model: its key 'transformer\.transformer_blocks"):
        Editor.load("tiny", loras=[str(path)])

    flux = tmp_path / "flux.safetensors"
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32)}, str(flux))
    with pytest.raises(ModelLoadError, match="single_transformer_blocks.0.attn.to_q.*names no linear layer"):
        Editor.load("tiny", loras=[str(flux)])

    weights = tmp_path / "not-a-lora.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(32, 32)}, str(weights))
    with pytest.raises(ModelLoadError, match="is not a LoRA weight"):
        Editor.load("tiny", loras=[str(weights)])

    with pytest.raises(ModelLoadError, match="^lora='missing/ink.safetensors' cannot be read"):
        Editor.load("tiny", loras=["missing/ink.safetensors"])


def test_the_result_and_its_metadata_name_the_loras(tiny_editor, tmp_path, photo):
    from qie.core.metadata import png_metadata

    path = tmp_path / "ink.safetensors"
    write_lora(tiny_editor.pipe.transformer, path, "lightning")
    editor = Editor.load("tiny", loras=[f"{path}:0.7"])
    request = small_request(photo, steps=2)
    result = editor.edit(request)
    assert result.notes[-1] == "LoRAs fused: ink.safetensors:0.7"
    assert png_metadata(editor, request, result)["loras"] == "ink.safetensors:0.7"
    assert editor.weights_id == f"tiny + {path}:0.7"  # the result cache keys on it
    assert list(result.image.getdata()) != list(tiny_editor.edit(request).image.getdata())


def test_a_lora_is_fused_before_the_stream_plan_packs_the_weights(tiny_editor, tmp_path, photo, monkeypatch):
    """The stream plan stores fp8 copies of the weights: they must already hold the LoRA."""
    from oracle import assert_matches_reference

    from qie.memory import plans

    path = tmp_path / "kohya.safetensors"
    write_lora(tiny_editor.pipe.transformer, path, "kohya", std=0.5)
    request = small_request(photo, steps=2)
    resident = Editor.load("tiny", loras=[str(path)]).edit(request).image

    sizes = plans.measure_sizes(tiny_editor.pipe)
    budget = plans.PLANS["stream"].need_gib(sizes) + sizes.blocks_fp8[0] * 1.5  # one block resident, one streamed
    monkeypatch.setattr(plans, "usable", lambda b: b)
    monkeypatch.setattr("qie.core.editor.choose_plan", lambda pipe, device, plan, budget: plans.PLANS["stream"])
    streamed = Editor.load("tiny", loras=[str(path)], plan="stream", vram_budget_gib=budget)
    assert streamed.plan.name == "stream"
    image = streamed.edit(request).image
    assert_matches_reference("plan-stream", image, resident)  # within fp8's tolerance of the fused LoRA
    with pytest.raises(AssertionError):  # ...and not of the model without it: the LoRA is in the streamed weights
        assert_matches_reference("plan-stream", image, tiny_editor.edit(request).image)
