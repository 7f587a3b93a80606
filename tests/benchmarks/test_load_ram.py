"""benchmarks.load_ram on the tiny pipeline saved in bf16: each case runs in its own process.

The full run (8.1 GiB model, `benchmarks/load-ram-cpu.json`) is `python3 -m benchmarks.load_ram --out benchmarks`.
RssAnon differences are noise at this size (a few MiB of imports); the copied-on-write pages of the
mapped weight files are exact, so the test checks those.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow  # three fresh Python processes that import diffusers

PAGE = 4096


def test_each_case_reports_its_row_and_fusing_copies_the_lora_targets_pages(tmp_path):
    import torch

    from benchmarks.load_ram import measure, meta, table
    from qie.core.tiny import build_tiny_pipeline
    from qie.speed.fast_mode import lora_target_modules

    pipe = build_tiny_pipeline().to(torch.bfloat16)
    pipe.save_pretrained(tmp_path / "model")
    targets = [m.weight for m in lora_target_modules(pipe.transformer).values()]
    target_bytes = sum(w.numel() * w.element_size() for w in targets)

    rows = {r["case"]: r for r in measure(tmp_path / "model", ("load", "lora_fused", "stream_pack"))}
    for r in rows.values():
        assert r["peak_rss_anon_gib"] >= r["rss_anon_after_load_gib"] > 0
        assert r["peak_rss_file_gib"] > 0 and r["load_s"] > 0
        assert set(r["weights_after_load"]) == {"transformer", "text_encoder", "vae"}
        for w in r["weights_after_load"].values():
            assert w["in_mmap_bytes"] == w["bytes"] > 0  # load_pipeline maps every weight, copies none

    assert rows["load"]["mmap_cow_bytes"] == 0
    # fuse_lora adds the delta in place: every page of the targeted weights is copied, little else
    fused = rows["lora_fused"]
    assert target_bytes <= fused["mmap_cow_bytes"] <= target_bytes + 2 * PAGE * len(targets)
    assert fused["weights_after"]["transformer"]["in_mmap_bytes"] == fused["weights_after"]["transformer"]["bytes"]
    # packing moves the blocks' weights into new buffers; the parameters no longer point at the file
    packed = rows["stream_pack"]
    assert packed["weights_after"]["transformer"]["bytes"] < packed["weights_after_load"]["transformer"]["bytes"]
    assert "BlockStreamer" in packed["note"]

    rows_list = list(rows.values())
    info = meta(tmp_path / "model", rows_list)
    assert info["layers"] == 2 and {"torch", "diffusers", "transformers", "safetensors"} <= set(info)
    assert all(f"| {case} |" in table(rows_list) for case in rows)
