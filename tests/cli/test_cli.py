"""The CLI as a person runs it: a subprocess, real files."""

import subprocess
import sys

import pytest
import torch
from conftest import EXAMPLES, ROOT
from PIL import Image

from qie.core.images import read_png_metadata

pytestmark = pytest.mark.slow  # each test runs the CLI in a fresh Python process


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "qie", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


FAST = ["--steps", "2", "--max-side", "128", "--condition-area", "output", "--seed", "11"]
IMPORTS = (
    "import sys; from qie.cli.main import main; code = main(sys.argv[1:]); "
    "print('model code imported:', 'diffusers' in sys.modules); sys.exit(code)"
)


def run_cli_reporting_imports(*args):
    """`python -m qie ARGS` that also prints, last, whether the model code (diffusers) was imported."""
    return subprocess.run([sys.executable, "-c", IMPORTS, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def edit_cup(tiny_dir, out, *extra):
    """`python -m qie edit coffee-cup.jpg --prompt "white background" ...` on the tiny model."""
    cup = str(EXAMPLES / "coffee-cup.jpg")
    return run_cli(
        "edit", cup, "--prompt", "white background", "--output", str(out), "--model", str(tiny_dir), *FAST, *extra
    )


def test_edit_single_file_writes_png_with_metadata(tiny_dir, tmp_path):
    out = tmp_path / "out.png"
    proc = edit_cup(tiny_dir, out)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (128, 96)
    meta = read_png_metadata(out)
    assert meta["prompt"] == "white background" and meta["seed"] == 11 and meta["steps"] == 2
    assert meta["model"] == str(tiny_dir) and meta["qie_version"]


def test_edit_with_rewrite_prints_and_uses_the_rewritten_prompt(tiny_dir, tmp_path):
    out = tmp_path / "out.png"
    proc = edit_cup(tiny_dir, out, "--rewrite")
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("rewritten prompt (coffee-cup.jpg): "))
    rewritten = line.split(": ", 1)[1]
    assert read_png_metadata(out)["prompt"] == rewritten


def test_edit_with_tiny_2511_names_the_variant_in_the_png(tiny_2511_editor, tmp_path):
    out = tmp_path / "o.png"
    proc = run_cli(
        "edit", str(EXAMPLES / "cat.jpg"), "--model", "tiny-2511", "--prompt", "a red hat", "--output", str(out), *FAST
    )
    assert proc.returncode == 0, proc.stderr
    meta = read_png_metadata(out)
    assert (meta["model"], meta["model_variant"]) == ("tiny-2511", "2511")


def test_edit_with_loras_records_them_and_refuses_a_foreign_file(tiny_editor, tmp_path):
    from lora_files import write_lora
    from safetensors.torch import save_file

    lora = tmp_path / "ink.safetensors"
    write_lora(tiny_editor.pipe.transformer, lora, "kohya")
    out = tmp_path / "o.png"
    args = ["edit", str(EXAMPLES / "cat.jpg"), "--model", "tiny", "--prompt", "ink", "--output", str(out), *FAST]
    proc = run_cli(*args, "--lora", f"{lora}:0.5", "--lora", str(lora))
    assert proc.returncode == 0, proc.stderr
    assert read_png_metadata(out)["loras"] == "ink.safetensors:0.5, ink.safetensors:1"
    foreign = tmp_path / "foreign.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8)}, str(foreign))
    bad = run_cli(*args, "--lora", str(foreign))
    assert bad.returncode == 2, bad.stderr
    assert "is not a LoRA for this model: its key 'lora_unet_double_blocks_0_img_attn_qkv" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_an_unknown_model_name_is_a_clear_error(tmp_path):
    proc = run_cli_reporting_imports(
        "edit", str(EXAMPLES / "cat.jpg"), "--prompt", "x", "--output", str(tmp_path / "o.png"), "--model", "2512"
    )
    assert proc.returncode == 2 and "--model 2512 is not valid" in proc.stderr and "tiny-2511" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "model code imported: False" in proc.stdout  # said before the slow imports


def test_edit_folder_reports_failures_and_resumes(tiny_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.open(EXAMPLES / "cat.jpg").save(src / "a.jpg")
    Image.open(EXAMPLES / "rocket.jpg").save(src / "b.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (src / "notes.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "out"
    args = ["edit", str(src), "--prompt", "remove the watermark", "--output", str(out), "--model", str(tiny_dir), *FAST]
    first = run_cli(*args)
    assert first.returncode == 1  # one file failed
    assert "2 edited, 0 skipped (output exists), 1 failed, 1 not images" in first.stdout
    assert "not taken: notes.txt: .txt is not an image type" in first.stdout
    assert "broken.jpg" in first.stdout and "cannot be read" in first.stdout
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    second = run_cli(*args)
    assert "0 edited, 2 skipped (output exists), 1 failed, 1 not images" in second.stdout


def test_bad_input_is_a_clear_error_without_loading(tmp_path):
    proc = run_cli_reporting_imports(
        "edit", str(EXAMPLES / "cat.jpg"), "--prompt", " ", "--output", str(tmp_path / "o.png"), "--model", "tiny"
    )
    assert proc.returncode == 2
    assert "--prompt ' ' is not valid" in proc.stderr and "describe the edit" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "model code imported: False" in proc.stdout


def test_info_prints_versions():
    proc = run_cli("info")
    assert proc.returncode == 0
    for name in ("qie", "torch", "diffusers", "transformers", "device"):
        assert name in proc.stdout
    for model in ("Qwen/Qwen-Image-Edit-2509", "Qwen/Qwen-Image-Edit-2511", "tiny-2511", "zero_cond_t=True"):
        assert model in proc.stdout


@pytest.mark.parametrize("model", ["Qwen/Qwen-Image-Edit-2509", "2511"])
def test_real_model_without_gpu_says_what_to_do(tmp_path, model):
    proc = run_cli_reporting_imports(
        "edit", str(EXAMPLES / "cat.jpg"), "--prompt", "x", "--output", str(tmp_path / "o.png"), "--model", model
    )
    assert proc.returncode == 2 and "model code imported: False" in proc.stdout
    assert "needs a CUDA GPU" in proc.stderr and "--model tiny" in proc.stderr and "--device cpu" in proc.stderr
    assert "model='tiny'" not in proc.stderr and "device='cpu'" not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_box_edit_keeps_pixels_outside_exactly(tiny_dir, tmp_path):
    out = tmp_path / "boxed.png"
    proc = run_cli(
        "edit",
        str(EXAMPLES / "coffee-cup.jpg"),
        "--prompt",
        "add a price tag",
        "--output",
        str(out),
        "--model",
        str(tiny_dir),
        "--box",
        "300,200,600,400",
        "--resize-to-input",
        *FAST,
    )
    assert proc.returncode == 0, proc.stderr
    original = Image.open(EXAMPLES / "coffee-cup.jpg").convert("RGB")
    edited = Image.open(out).convert("RGB")
    assert edited.size == original.size
    assert edited.crop((0, 0, 300, 200)).tobytes() == original.crop((0, 0, 300, 200)).tobytes()
    bad = run_cli(
        "edit",
        str(EXAMPLES / "cat.jpg"),
        "--prompt",
        "x",
        "--output",
        str(tmp_path / "b.png"),
        "--model",
        "tiny",
        "--box",
        "1,2,three,4",
    )
    assert bad.returncode == 2 and "--box 1,2,three,4" in bad.stderr and "four whole numbers" in bad.stderr


def test_the_torchrun_entry_point_names_itself_and_its_own_flag_in_help(capsys):
    """`python -m qie.cli.parallel --help` used to print the usage of `python -m qie edit`."""
    import pytest

    from qie.cli.parallel import main as parallel_main

    with pytest.raises(SystemExit) as stop:
        parallel_main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0
    assert out.startswith("usage: torchrun --nproc-per-node N -m qie.cli.parallel") and "--cp-mode" in out
