"""Batch throughput on a GPU with the full-size model (random weights are fine). Not run in CI."""

import pytest

pytestmark = pytest.mark.gpu


def test_bench_batching_on_gpu():
    import torch

    from benchmarks.batching import bench_batching
    from benchmarks.random_model import build_random_pipeline

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pipe = build_random_pipeline("cuda")  # full-size shapes, random weights: no download
    rows = bench_batching(pipe, sizes=[(512, 512)], batch_sizes=[1, 2], steps=2, repeats=1)
    assert [r["batch"] for r in rows] == [1, 2]
    assert rows[0]["speedup_vs_batch1"] == 1.0
    assert all(r["images_per_hour"] > 0 for r in rows)
    print(rows)


def test_bench_batching_accepts_a_bare_pipeline(tiny_editor):
    from benchmarks.batching import bench_batching

    # Runs on CPU too, but is kept with the GPU tests: it is a benchmark, not a check for CI.
    rows = bench_batching(tiny_editor.pipe, sizes=[(64, 64)], batch_sizes=[1, 2], steps=2, repeats=1)
    assert [r["batch"] for r in rows] == [1, 2] and rows[1]["speedup_vs_batch1"] > 0
