"""The GPU's SM clock, power draw and clock-limit reasons sampled beside a bench run, summed up per row.

On the H200 the fast path's steps run at the 700 W power cap (stock's too): the SM clock drops
below its maximum and a kernel that does the same work in less time need not shorten a step. A
lever's A/B is read right only next to the clock and power it ran at, so the bench samples them
with `nvidia-smi` every `interval_ms` in a child process (no Python thread, no NVML binding
needed) and gives each row a summary of the samples taken while the GPU was busy in that row's
window. The raw samples are kept as `smi-<tag>.csv` beside the JSON.

Example:
    >>> samples = [Sample(t=float(i), sm_mhz=1700.0 + i, power_w=690.0, util=100.0, reasons=0x4) for i in range(5)]
    >>> summarize(samples, 0.0, 10.0)["power_capped"]
    1.0
    >>> summarize(samples, 20.0, 30.0) is None
    True
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

QUERY = "timestamp,clocks.sm,power.draw,utilization.gpu,clocks_throttle_reasons.active"
TIME_FORMAT = "%Y/%m/%d %H:%M:%S.%f"  # nvidia-smi's timestamp, in the machine's local time
BUSY_UTIL = 50.0  # samples below this GPU utilization (compiles, host work) are left out of a summary
POWER_REASONS = 0x4 | 0x80  # software power cap, hardware power brake
THERMAL_REASONS = 0x20 | 0x40  # software and hardware thermal slowdown
STARTUP_S = 0.3  # how long `start` waits to see that nvidia-smi keeps running


@dataclass(frozen=True)
class Sample:
    """One `nvidia-smi` line: Unix time, SM clock, power, utilization and the clock-limit reason bits."""

    t: float
    sm_mhz: float
    power_w: float
    util: float
    reasons: int


def parse_line(line: str) -> Sample | None:
    """A `Sample` from one CSV line of `QUERY` (with or without units), or None for a header or a line
    with a field nvidia-smi could not read ("[N/A]").

    Example:
        >>> parse_line("2026/12/03 10:23:31.708, 1740 MHz, 643.10 W, 100 %, 0x0000000000000004").power_w
        643.1
    """
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 5:
        return None
    try:
        t = datetime.strptime(parts[0], TIME_FORMAT).timestamp()
        sm, power, util = (float(p.split()[0]) for p in parts[1:4])
        reasons = int(parts[4], 16)
    except (ValueError, IndexError):
        return None
    return Sample(t, sm, power, util, reasons)


def summarize(samples: list[Sample], start: float, end: float) -> dict[str, Any] | None:
    """The busy samples between Unix times `start` and `end`: their count, SM clock median and 10th
    percentile, power median, and the fraction limited by power and by heat; None when there are none."""
    busy = [s for s in samples if start <= s.t <= end and s.util >= BUSY_UTIL]
    if not busy:
        return None
    clocks = sorted(s.sm_mhz for s in busy)
    return {
        "samples": len(busy),
        "sm_mhz_median": statistics.median(clocks),
        "sm_mhz_p10": clocks[len(clocks) // 10],
        "power_w_median": statistics.median(s.power_w for s in busy),
        "power_capped": sum(bool(s.reasons & POWER_REASONS) for s in busy) / len(busy),
        "thermal_limited": sum(bool(s.reasons & THERMAL_REASONS) for s in busy) / len(busy),
    }


class ClockTrace:
    """`nvidia-smi` sampling the GPU `gpu` (an index or "GPU-<uuid>") every `interval_ms` into `path` until
    `stop`. `start` returns why no trace runs (no `nvidia-smi` on the PATH, or it would not start), or None.
    """

    def __init__(self, path: Path, gpu: int | str = 0, interval_ms: int = 100, binary: str = "nvidia-smi") -> None:
        self.path, self.gpu, self.interval_ms, self.binary = Path(path), gpu, interval_ms, binary
        self._process: subprocess.Popen | None = None
        self._file: Any = None

    def start(self) -> str | None:
        found = shutil.which(self.binary)
        if found is None:
            return f"{self.binary} not found"
        command = [
            found,
            f"--query-gpu={QUERY}",
            "--format=csv,noheader,nounits",
            f"--loop-ms={self.interval_ms}",
            f"--id={self.gpu}",
        ]
        self._file = self.path.open("w")
        try:
            self._process = subprocess.Popen(command, stdout=self._file, stderr=subprocess.DEVNULL)
            code = self._process.wait(timeout=STARTUP_S)  # a GPU it does not know: it exits at once
        except subprocess.TimeoutExpired:
            return None  # sampling
        except OSError as exc:
            code = f"did not start: {exc}"
        self.stop()
        return f"{self.binary} --id={self.gpu}: {code if isinstance(code, str) else f'exited at once (code {code})'}"

    def samples(self) -> list[Sample]:
        """The samples written so far."""
        if not self.path.exists():
            return []
        lines = self.path.read_text(errors="replace").splitlines()
        return [s for s in map(parse_line, lines) if s is not None]

    def summary(self, start: float, end: float) -> dict[str, Any] | None:
        """`summarize` over the samples written so far."""
        return summarize(self.samples(), start, end)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
            self._process = None
        if self._file is not None:
            self._file.close()
            self._file = None
