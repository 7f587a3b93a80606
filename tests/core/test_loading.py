"""The real loading path: from_pretrained on a saved folder, offline errors, hardware checks."""

import numpy as np
import pytest
from conftest import small_request

from qie import Editor, ModelLoadError, ResourceError
from qie.core.models import check_hardware, load_pipeline, resolve_dtype
from qie.core.registry import REAL_MODEL_ID, resolve_model


@pytest.mark.slow
def test_make_tiny_then_load_folder_like_the_real_model(tmp_path, photo, tiny_editor):
    import subprocess
    import sys

    folder = tmp_path / "tiny-qie"
    proc = subprocess.run([sys.executable, "-m", "qie", "make-tiny", str(folder)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (folder / "model_index.json").is_file() and (folder / "transformer").is_dir()
    editor = Editor.load(str(folder))
    assert type(editor.pipe).__name__ == "QwenImageEditPlusPipeline"
    result = editor.edit(small_request(photo))
    reference = tiny_editor.edit(small_request(photo)).image
    # Same seed and weights; a memory-mapped load may differ by rounding only.
    diff = np.abs(np.asarray(result.image, dtype=int) - np.asarray(reference, dtype=int)).max()
    assert diff <= 2


def test_hub_id_offline_without_cache_is_a_clear_error(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(REAL_MODEL_ID, device=torch.device("cpu"), dtype=torch.bfloat16)
    text = str(info.value)
    assert REAL_MODEL_ID in text and "HF_HUB_OFFLINE is set" in text and "--model tiny" in text


def test_missing_local_folder_pieces(tmp_path):
    import torch

    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="not a complete diffusers pipeline"):
        load_pipeline(str(tmp_path), device=torch.device("cpu"), dtype=torch.float32)


@pytest.mark.parametrize("model", [REAL_MODEL_ID, "2511"])
def test_real_model_refused_on_cpu_with_numbers(model):
    import torch

    with pytest.raises(ResourceError) as info:
        check_hardware(resolve_model(model), torch.device("cpu"))
    assert "needs a CUDA GPU" in str(info.value) and "GiB" in str(info.value) and "tiny" in str(info.value)
    check_hardware(resolve_model("tiny-2511"), torch.device("cpu"))  # the tiny models run anywhere


def test_dtype_policy_on_cpu_and_explicit():
    import torch

    assert resolve_dtype(torch.device("cpu")) == torch.float32
    assert resolve_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    with pytest.raises(Exception, match="dtype"):
        resolve_dtype(torch.device("cpu"), "int3")
