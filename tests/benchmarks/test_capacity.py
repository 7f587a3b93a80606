"""Capacity figures from a benchmark JSON (and the labelled placeholder anchors)."""

import json

import pytest

from benchmarks.capacity import PLACEHOLDER, capacity, edit_seconds, main, report
from qie import InvalidRequestError


def test_measured_end_to_end_wins_over_parts():
    row = {"size": 1024, "e2e_8_nocfg_s": 2.0, "e2e_40_cfg_s": 20.0, "step_s_nocfg": 9.0, "step_s_cfg": 9.0}
    assert edit_seconds(row, "fast") == 2.0 and edit_seconds(row, "quality") == 20.0
    parts = {"size": 1024, "step_s_nocfg": 0.25, "step_s_cfg": 0.5, "text_encode_s": 0.1, "decode_s": 0.2}
    assert edit_seconds(parts, "fast") == pytest.approx(0.1 + 8 * 0.25 + 0.2)
    assert edit_seconds(parts, "quality") == pytest.approx(2 * 0.1 + 40 * 0.5 + 0.2)


def test_images_per_day_and_replicas():
    (cap,) = capacity([{"name": "x", "size": 1024, "e2e_8_nocfg_s": 0.864, "e2e_40_cfg_s": 8.64}], utilization=0.5)
    assert cap.fast_per_day == pytest.approx(50_000) and cap.quality_per_day == pytest.approx(5_000)
    assert cap.replicas("fast", 100_000) == 2 and cap.replicas("quality", 100_000) == 20
    assert capacity([{"size": 512, "e2e_8_nocfg_s": 1}]) == []  # other sizes are skipped
    with pytest.raises(InvalidRequestError, match="utilization=0"):
        capacity([], utilization=0)


def test_report_labels_placeholders_and_reads_json(tmp_path, capsys):
    assert "PLACEHOLDER" in report(PLACEHOLDER)
    bench = {
        "meta": {"device": "GPU-X", "date": "2026-01-01"},
        "rows": [{"name": "resident", "size": 1024, "e2e_8_nocfg_s": 4.32, "e2e_40_cfg_s": 43.2}],
        "batching": [
            {"width": 1024, "height": 1024, "batch": 2, "steps": 4, "true_cfg_scale": 4.0, "images_per_hour": 1000}
            | {"speedup_vs_batch1": 1.25}
        ],
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    assert main([str(path), "--target", "100000"]) == 0
    out = capsys.readouterr().out
    assert "PLACEHOLDER" not in out and "GPU-X" in out
    assert "| resident | 4.32 | 20,000 | 5 | 43.20 | 2,000 | 50 |" in out
    assert "| 2 | 4 | 4.0 | 24,000 | 1.25x |" in out
