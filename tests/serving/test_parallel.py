"""Multi-GPU layouts (logic only here) and CFG-parallel over two CPU processes (gloo)."""

import logging
import os
import subprocess
import sys

import pytest
from conftest import EXAMPLES, ROOT, small_request
from oracle import assert_matches_reference
from PIL import Image
from redis_server import free_port

from qie import InvalidRequestError
from qie.serving.parallel import ParallelLayout, plan_layout


def test_one_device_falls_back_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="qie.serving.parallel"):
        assert plan_layout(1, cfg=True) is None
    assert "running on one device" in caplog.text


@pytest.mark.parametrize(
    ("gpus", "cfg", "mode", "expected"),
    [
        (2, True, "ulysses", "cfg 2 (2 ranks)"),
        (2, False, "ulysses", "ulysses 2 (2 ranks)"),
        (4, True, "ring", "cfg 2 x ring 2 (4 ranks)"),
        (8, True, "ulysses", "cfg 2 x ulysses 4 (8 ranks)"),
        (6, False, "ring", "ring 6 (6 ranks)"),
    ],
)
def test_layouts(gpus, cfg, mode, expected):
    assert plan_layout(gpus, cfg=cfg, cp_mode=mode).describe() == expected


def test_odd_count_with_cfg_warns_and_uses_context_parallel_only(caplog):
    with caplog.at_level(logging.WARNING, logger="qie.serving.parallel"):
        layout = plan_layout(3, cfg=True)
    assert (layout.cfg_degree, layout.cp_degree) == (1, 3)
    assert "even number" in caplog.text


def test_roles_and_config():
    layout = plan_layout(4, cfg=True)
    roles = [layout.role(r) for r in range(4)]
    assert [(r.device, r.branch, r.cp_rank) for r in roles] == [
        ("cuda:0", "cond", 0),
        ("cuda:1", "cond", 1),
        ("cuda:2", "uncond", 0),
        ("cuda:3", "uncond", 1),
    ]
    config = layout.context_parallel_config()
    assert (config.ulysses_degree, config.ring_degree, config.ulysses_anything) == (2, 1, True)
    ring = plan_layout(4, cfg=False, cp_mode="ring").context_parallel_config()
    assert (ring.ring_degree, ring.ring_anything) == (4, True)
    assert plan_layout(2, cfg=True).context_parallel_config() is None  # two GPUs: one branch each


def test_invalid_layouts():
    with pytest.raises(InvalidRequestError, match="at most 24 GPUs per group"):
        plan_layout(32, cfg=False, heads=24)
    with pytest.raises(InvalidRequestError, match="cp_mode='tree'"):
        plan_layout(2, cfg=False, cp_mode="tree")
    with pytest.raises(InvalidRequestError, match="world_size"):
        ParallelLayout(world_size=3, cfg_degree=2, cp_degree=2, cp_mode="ulysses")


@pytest.mark.slow
def test_cfg_parallel_on_two_processes_matches_one(tiny_editor, tiny_dir, tmp_path):
    out = tmp_path / "parallel.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    cmd += ["-m", "qie.cli.parallel", str(EXAMPLES / "coffee-cup.jpg"), "--prompt", "replace the background with white"]
    cmd += ["--output", str(out), "--model", "tiny", "--device", "cpu", "--steps", "3", "--seed", "4"]
    cmd += ["--max-side", "128", "--condition-area", "output"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cfg 2 (2 ranks)" in proc.stdout
    assert "rank 1/2: uncond" in proc.stderr
    single = tiny_editor.edit(small_request(Image.open(EXAMPLES / "coffee-cup.jpg").convert("RGB"), seed=4)).image
    assert_matches_reference("cfg-parallel", Image.open(out).convert("RGB"), single)
    assert not list(tmp_path.glob(".rank*"))


def test_parallel_benchmark_refuses_to_run_without_torchrun_and_gpus(capsys):
    from benchmarks import bench_parallel

    assert bench_parallel.main(["--out", "unused"]) == 2
    assert "torchrun" in capsys.readouterr().err
