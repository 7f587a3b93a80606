"""Each output-changing speed option against the stock diffusers reference, within its declared tolerance."""

import dataclasses

import pytest
from oracle import assert_matches_reference

pytestmark = pytest.mark.slow  # runs the stock diffusers pipeline as the reference


@pytest.fixture()
def no_fixes(tiny_editor):
    # The reference is stock diffusers: compare with qie's deliberate fixes off, so only the option differs.
    tiny_editor.fixes["mm_token_type_ids"] = False
    yield tiny_editor
    tiny_editor.fixes["mm_token_type_ids"] = True


@pytest.mark.parametrize(
    ("option", "changes", "check"),
    [
        (
            "step-cache-fbcache",
            {"step_cache": "fbcache", "step_cache_threshold": 1.0},
            lambda r: r.cached_calls > 0 and r.steps_run == 3,
        ),
        (
            "step-cache-taylorseer",
            {"step_cache": "taylorseer", "step_cache_interval": 2},
            lambda r: r.cached_calls == 2,  # cond and uncond of step 3 are extrapolated
        ),
        (
            "early-exit",
            # A step's change is read at the next step: with 4 steps, it stops after 3 (x0 settled at step 2).
            {"early_exit_threshold": 1.0, "early_exit_patience": 1, "steps": 4},
            lambda r: (r.steps_run, r.steps_skipped) == (3, 1),
        ),
    ],
)
def test_option_within_tolerance(no_fixes, oracle_case, option, changes, check):
    request, reference = oracle_case
    result = no_fixes.edit(dataclasses.replace(request, **changes))
    assert check(result), result
    diff = assert_matches_reference(option, result.image, reference)
    assert diff.max_abs > 0  # the option really changed the computation


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantized_attention_within_tolerance_on_gpu(mode, photo):
    """Needs a CUDA GPU and sageattention >= 2.1.1 (the CPU tests cover the fallback)."""
    import importlib.util

    import torch

    from qie import Editor, EditRequest

    if not torch.cuda.is_available() or importlib.util.find_spec("sageattention") is None:
        pytest.skip("needs a CUDA GPU and sageattention")
    editor = Editor.load("tiny", device="cuda", dtype=torch.bfloat16, fixes={"mm_token_type_ids": False})
    request = EditRequest(
        images=[photo], prompt="white background", steps=4, seed=3, max_side=256, condition_area="model"
    )
    result = editor.edit(dataclasses.replace(request, attention_quant=mode))
    assert "SageAttention" in result.notes[0], result.notes
    assert_matches_reference("attention-quant", result.image, editor.reference(request))
