"""The model registry: `--model` values, variants read from configs, and the 2511 flavour of the tiny model."""

import json
import logging

import pytest
from conftest import small_request

from qie import InvalidRequestError
from qie.core.registry import MODELS, resolve_model


@pytest.mark.parametrize(
    ("value", "name", "variant"),
    [
        ("2509", "Qwen/Qwen-Image-Edit-2509", "2509"),
        ("2511", "Qwen/Qwen-Image-Edit-2511", "2511"),
        ("Qwen/Qwen-Image-Edit-2511", "Qwen/Qwen-Image-Edit-2511", "2511"),
        ("tiny", "tiny", "2509"),
        ("tiny-2511", "tiny-2511", "2511"),
    ],
)
def test_registry_names_and_hub_ids_resolve(value, name, variant):
    resolved = resolve_model(value)
    assert (resolved.name, resolved.variant, resolved.registered) == (name, variant, True)


def test_registry_entries_name_their_lightning_files():
    assert MODELS["2509"].lightning.location(MODELS["2509"].lightning.weight_name(8, "bf16")) == (
        "lightx2v/Qwen-Image-Lightning/Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16.safetensors"
    )
    lightning = MODELS["2511"].lightning
    assert lightning.weight_name(4, "fp32") == "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-fp32.safetensors"
    # only a bf16 8-step file is published for 2511: an fp32 model gets it (load_lora_weights casts)
    assert lightning.weight_name(8, "fp32") == "Qwen-Image-Edit-2511-Lightning-8steps-V1.0-bf16.safetensors"
    with pytest.raises(InvalidRequestError, match="^fast_steps=6"):
        lightning.weight_name(6, "bf16")
    assert MODELS["2511"].zero_cond_t and not MODELS["2509"].zero_cond_t


@pytest.mark.parametrize("zero_cond_t", [True, False])
def test_a_local_folder_is_recognized_from_its_transformer_config(tmp_path, zero_cond_t):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"zero_cond_t": zero_cond_t}))
    resolved = resolve_model(str(tmp_path))
    assert resolved.variant == ("2511" if zero_cond_t else "2509")
    assert resolved.source == str(tmp_path) and not resolved.registered


def test_an_unknown_hub_id_loads_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="qie.core.registry"):
        resolved = resolve_model("someone/qwen-edit-finetune")
    assert resolved.source == "someone/qwen-edit-finetune" and resolved.spec is None
    assert "not in qie's registry" in caplog.text


@pytest.mark.parametrize("value", ["2512", "tiny-2509x", "/no/such/folder"])
def test_an_unknown_name_is_refused_with_the_choices(value):
    with pytest.raises(InvalidRequestError, match=f"^model={value!r}.*2509, 2511, tiny, tiny-2511"):
        resolve_model(value)


def test_tiny_2511_is_the_zero_cond_t_flavour_and_it_changes_the_edit(tiny_editor, tiny_2511_editor, photo):
    from qie.core.models import tiny_model_dir

    assert tiny_2511_editor.pipe.transformer.config.zero_cond_t and not tiny_editor.pipe.transformer.config.zero_cond_t
    assert (tiny_2511_editor.variant, tiny_editor.variant) == ("2511", "2509")
    # same weights, only the flag differs: the condition tokens' t=0 modulation must show in the output
    request = small_request(photo, steps=2, max_side=128)
    a, b = tiny_editor.edit(request).image, tiny_2511_editor.edit(request).image
    assert list(a.getdata()) != list(b.getdata())
    assert resolve_model(str(tiny_model_dir(variant="2511"))).variant == "2511"  # its saved folder, read back
