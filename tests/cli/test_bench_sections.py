"""`python -m qie bench --help` names exactly the sections the bench runs."""

from benchmarks import bench, bench_fast
from qie.cli.main import BENCH_SECTIONS


def test_the_help_lists_every_section_the_bench_has():
    assert set(BENCH_SECTIONS) == set(bench.SECTIONS) | set(bench_fast.SECTIONS)
