"""`python -m qie plan`: the plan and predicted times for a GPU, without loading anything."""

import pytest

from qie.cli.main import main


def test_plan_for_an_h200_at_10_gib(capsys):
    assert main(["plan", "--gpu", "h200", "--vram", "10"]) == 0
    out = capsys.readouterr().out
    assert "plan 'stream'" in out and "19 of 60 blocks resident" in out
    assert "forward 0.268 s (pcie-bound)" in out and "CFG step 0.434 s (batched" in out


@pytest.mark.parametrize(
    ("vram", "stages"),
    [
        ("10", "stages: text encoder stream-fp8, VAE in 576-px tiles"),
        ("24", "stages: text encoder stream-fp8, VAE in 576-px tiles"),
        ("32", "stages: text encoder resident-fp8, VAE in 576-px tiles"),
        ("80", "stages: text encoder and VAE on the GPU, VAE untiled"),
    ],
)
def test_plan_says_where_the_text_encoder_and_vae_run(vram, stages, capsys):
    assert main(["plan", "--gpu", "h200", "--vram", vram]) == 0
    assert stages in capsys.readouterr().out


def test_given_rates_replace_the_parameter_set(capsys):
    assert main(["plan", "--gpu", "rtx4090", "--vram", "10", "--pcie", "6", "--tflops", "165"]) == 0
    out = capsys.readouterr().out
    assert "given: 6 GB/s PCIe, 165 TFLOP/s" in out and "(pcie-bound)" in out


def test_every_documented_gpu_gets_a_labelled_prediction(capsys):
    assert main(["plan", "--gpu", "all"]) == 0
    out = capsys.readouterr().out
    for label in ("RTX 4090", "RTX 4060 Ti 16GB", "RTX 3090", "L4", "A100 40GB"):
        assert label in out
    assert out.count("(prediction)") == 5


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["plan", "--vram", "3"], "--vram 3: the smallest plan ('stream') needs a budget of at least 3.7 GiB"),
        (["plan", "--gpu", "tpu"], "--gpu"),
        (["plan", "--pcie", "0"], "--pcie"),
    ],
)
def test_bad_input_names_the_flag(argv, words, capsys):
    assert main(argv) == 2
    assert words in capsys.readouterr().err
