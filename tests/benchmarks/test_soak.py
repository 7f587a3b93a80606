"""Soak (bounded for CI): many small edits in a row keep host memory flat.

The full run is `python -m qie soak --model tiny --edits 200` (README, "Limits and behaviour").
"""

from __future__ import annotations

import json

import pytest

from benchmarks.soak import soak

pytestmark = pytest.mark.slow  # repeated edits

EDITS = 20
MAX_GROWTH_MIB = 48  # measured: -10 to +10 MiB over 20-200 edits; a leak of ~2.5 MiB per edit fails


def test_rss_stays_flat_over_repeated_edits(tiny_editor):
    report = soak(tiny_editor, EDITS, warmup=2, size=64, steps=2)
    assert report.failures == 0 and report.edits == EDITS
    assert report.rss_growth_mib < MAX_GROWTH_MIB, report
    assert report.rss_max_mib - report.rss_start_mib < 2 * MAX_GROWTH_MIB, report
    assert report.vram_start_mib is None  # CPU


def test_soak_command_prints_a_json_report(capsys):
    from qie.cli.main import main

    assert main(["soak", "--model", "tiny", "--edits", "2", "--size", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["edits"] == 2 and report["failures"] == 0 and "rss_growth_mib" in report
