"""The bench's clock and power trace: nvidia-smi's lines parsed, summed up per window, and a row's share."""

import os
import stat
import time
from datetime import datetime

import pytest

from benchmarks.clocks import ClockTrace, Sample, parse_line, summarize

FAKE_SMI = """#!/bin/bash
case "$*" in *--query-gpu=timestamp,clocks.sm,power.draw*--loop-ms=*) ;; *) echo "bad arguments: $*" >&2; exit 2;; esac
while true; do
  echo "$(date '+%Y/%m/%d %H:%M:%S.%3N'), 1725, 690.50, 100, 0x0000000000000004"
  sleep 0.05
done
"""


@pytest.fixture()
def fake_smi(tmp_path, monkeypatch):
    """An `nvidia-smi` on the PATH that prints a busy, power-capped sample every 50 ms."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "nvidia-smi"
    script.write_text(FAKE_SMI)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return script


def test_lines_with_and_without_units_parse_and_others_do_not():
    stamp = "2026/12/03 10:23:31.708"
    with_units = parse_line(f"{stamp}, 1740 MHz, 643.10 W, 99 %, 0x0000000000000004")
    bare = parse_line(f"{stamp}, 1740, 643.10, 99, 0x0000000000000004")
    assert with_units == bare
    assert bare.t == datetime(2026, 12, 3, 10, 23, 31, 708000).timestamp()
    assert (bare.sm_mhz, bare.power_w, bare.util, bare.reasons) == (1740.0, 643.1, 99.0, 4)
    assert parse_line("timestamp, clocks.current.sm [MHz], power.draw [W], utilization.gpu [%], reasons") is None
    assert parse_line(f"{stamp}, [N/A], 643.10, 99, 0x4") is None
    assert parse_line("") is None


def test_a_summary_keeps_the_busy_samples_of_its_window():
    samples = [
        Sample(t=float(i), sm_mhz=1600.0 + 10 * i, power_w=600.0 + i, util=100.0, reasons=0x4) for i in range(10)
    ]
    samples += [Sample(t=4.5, sm_mhz=1980.0, power_w=80.0, util=0.0, reasons=0x1)]  # idle: left out
    samples += [Sample(t=5.5, sm_mhz=1500.0, power_w=700.0, util=100.0, reasons=0x20)]  # busy, thermal, not power
    got = summarize(samples, 2.0, 6.0)
    assert got["samples"] == 6  # t = 2, 3, 4, 5, 6 and the thermal one
    assert got["sm_mhz_median"] == pytest.approx(1635.0)  # 1500, 1620, 1630, 1640, 1650, 1660
    assert got["sm_mhz_p10"] == 1500.0
    assert got["power_capped"] == pytest.approx(5 / 6)
    assert got["thermal_limited"] == pytest.approx(1 / 6)
    assert summarize(samples, 100.0, 200.0) is None


def test_a_trace_samples_until_stopped(fake_smi, tmp_path):
    trace = ClockTrace(tmp_path / "smi.csv", gpu="GPU-test", interval_ms=50)
    start = time.time()
    assert trace.start() is None
    try:
        time.sleep(0.6)
        summary = trace.summary(start - 1, time.time() + 1)
    finally:
        trace.stop()
    assert summary is not None and summary["samples"] >= 3
    assert summary["sm_mhz_median"] == 1725.0 and summary["power_capped"] == 1.0
    written = len(trace.samples())
    time.sleep(0.2)
    assert len(trace.samples()) == written  # stopped: nothing more is written


def test_an_nvidia_smi_that_exits_at_once_is_no_trace(tmp_path, monkeypatch):
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "nvidia-smi"
    script.write_text("#!/bin/bash\necho 'No devices were found' >&2\nexit 6\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    trace = ClockTrace(tmp_path / "smi.csv", gpu="GPU-unknown")
    assert trace.start() == "nvidia-smi --id=GPU-unknown: exited at once (code 6)"
    assert trace.samples() == []


def test_without_nvidia_smi_a_trace_says_why_and_runs_nothing(tmp_path):
    trace = ClockTrace(tmp_path / "smi.csv", binary="nvidia-smi-that-is-not-there")
    assert trace.start() == "nvidia-smi-that-is-not-there not found"
    assert trace.samples() == [] and trace.summary(0, time.time()) is None
    trace.stop()


def test_a_bench_row_gets_the_clocks_of_its_window(fake_smi, tmp_path):
    from benchmarks.bench import Bench
    from benchmarks.probes import Row
    from qie.cli.main import build_parser

    bench = Bench(build_parser().parse_args(["bench", "--out", str(tmp_path), "--tag", "t", "--device", "cpu"]))
    assert bench.clocks is None and bench.payload()["meta"]["clock_trace"] == "off: not a CUDA device"
    bench.clocks = ClockTrace(tmp_path / "smi-t.csv", interval_ms=50)  # as on a CUDA device
    assert bench.clocks.start() is None
    try:
        bench.row_start = time.time()
        time.sleep(0.5)
        bench.add(Row(name="a row", size=64, plan="resident"))
    finally:
        bench.stop_clocks()
    clocks = bench.payload()["rows"][0]["clocks"]
    assert clocks["samples"] >= 3 and clocks["power_w_median"] == 690.5


@pytest.mark.parametrize(
    ("accepted", "expected"),
    [("GPU-ffc79498-8ff3-c2dc-3b0d-fafd804516ae", "--id=GPU-ffc79498"), ("0", "--id=0 "), ("none", "off: ")],
)
def test_the_bench_names_its_gpu_by_uuid_then_by_index(tmp_path, monkeypatch, accepted, expected):
    """torch gives the UUID without nvidia-smi's "GPU-" prefix; an nvidia-smi that does not know it gets the index."""
    import types

    import torch

    from benchmarks.bench import Bench
    from qie.cli.main import build_parser

    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "nvidia-smi"
    script.write_text(
        f'#!/bin/bash\ncase "$*" in *--id={accepted}) ;; *) exit 6;; esac\nwhile true; do sleep 0.05; done\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    props = types.SimpleNamespace(uuid="ffc79498-8ff3-c2dc-3b0d-fafd804516ae")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    bench = Bench(build_parser().parse_args(["bench", "--out", str(tmp_path), "--tag", "t", "--device", "cpu"]))
    bench.device = torch.device("cuda", 0)  # as on a GPU machine
    try:
        note = bench.start_clocks()
    finally:
        bench.stop_clocks()
    assert expected in f"{note} "
    assert (bench.clocks is None) == (accepted == "none")
