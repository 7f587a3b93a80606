"""The benchmark's own logic, on the tiny model on CPU (its numbers mean nothing here; its checks do)."""

import argparse
import json

import pytest

pytestmark = pytest.mark.slow  # every benchmark section on the tiny model


def test_bench_tiny_writes_json_with_bit_exact_stock_and_ratios(tmp_path, monkeypatch):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

    from benchmarks.bench import run

    # Both paths VAE-encode the input at the output's area (not ~1024²): same comparison, CPU-cheap.
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 64 * 64)
    monkeypatch.setattr("qie.core.grouping.VAE_IMAGE_SIZE", 64 * 64)

    args = argparse.Namespace(
        sections="stock,resident,fast,options,batching",
        sizes="64",
        budgets="",
        probe_steps=2,
        option_steps=3,
        e2e_40=False,
        scale="tiny",
        device="cpu",
        seed=0,
        out=str(tmp_path),
        tag="t",
        max_seconds=0,
    )
    assert run(args) == 0
    data = json.loads((tmp_path / "bench-t.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    stock, staged = rows["stock diffusers (resident, sdpa)"], rows["qie resident (sdpa)"]
    assert stock["max_abs_vs_ref"] == 0  # stock == qie's staged path with fixes off, bit for bit
    assert staged["max_abs_vs_ref"] == 0
    assert staged["ratio_step_cfg"] > 0 and stock["step_s_nocfg"] > 0
    assert data["meta"]["scale"] == "tiny" and data["errors"] == []
    assert {"fast_8", "fast_4"} <= {k for r in data["rows"] for k in r["e2e_s"]}
    assert any(r["name"].startswith("condition_area=output") for r in data["rows"])
    assert [b["batch"] for b in data["batching"]] == [1, 2, 4]
    assert stock["profile"]["forward_s"] > 0 and not stock["notes"]  # the profile's trigger is a valid edit
