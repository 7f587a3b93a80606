"""One edit over several GPUs (torchrun), against the one-GPU edit. Not run in CI: needs CUDA GPUs."""

import os
import subprocess
import sys

import pytest
from conftest import EXAMPLES, ROOT
from oracle import assert_matches_reference
from PIL import Image
from redis_server import free_port

pytestmark = pytest.mark.gpu

ARGS = ["--prompt", "replace the background with white", "--model", "tiny", "--steps", "3", "--seed", "4"]
ARGS += ["--max-side", "256", "--condition-area", "output"]


def torchrun(n, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", str(free_port())]
    cmd += ["-m", "qie.cli.parallel", str(EXAMPLES / "coffee-cup.jpg"), *ARGS, "--output", str(out), *extra]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # keep installed extras
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def gpus():
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def test_one_gpu_falls_back_to_the_ordinary_edit(tmp_path):
    if gpus() < 1:
        pytest.skip("needs a CUDA GPU")
    proc = torchrun(1, tmp_path / "one.png")
    assert "running on one device" in proc.stderr and "(one device)" in proc.stdout


@pytest.mark.parametrize(("n", "mode", "option"), [(2, "ulysses", "cfg-parallel"), (2, "ring", "cfg-parallel")])
def test_cfg_parallel_on_gpus(tmp_path, n, mode, option):
    if gpus() < n:
        pytest.skip(f"needs {n} CUDA GPUs")
    torchrun(1, tmp_path / "one.png")
    torchrun(n, tmp_path / "many.png", "--cp-mode", mode)
    assert_matches_reference(option, Image.open(tmp_path / "many.png"), Image.open(tmp_path / "one.png"))


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_context_parallel_on_gpus(tmp_path, mode):
    n = gpus()
    if n < 2:
        pytest.skip("needs 2 or more CUDA GPUs")
    torchrun(1, tmp_path / "one.png", "--cfg", "1")
    proc = torchrun(n, tmp_path / "many.png", "--cfg", "1", "--cp-mode", mode)
    assert f"{mode} {n}" in proc.stdout
    assert_matches_reference("context-parallel", Image.open(tmp_path / "many.png"), Image.open(tmp_path / "one.png"))
