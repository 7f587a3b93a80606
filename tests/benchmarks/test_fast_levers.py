"""The lever A/B script: its sections are the documented ones, and without a GPU it says so."""

import pytest

from benchmarks import fast_levers


def test_every_section_is_documented():
    for name in fast_levers.SECTIONS:
        assert f"  {name} " in fast_levers.__doc__


def test_without_a_gpu_it_refuses_by_name(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        fast_levers.main(["--sections", "kernels"])
    assert "needs a CUDA GPU" in capsys.readouterr().err
