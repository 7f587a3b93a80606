"""qie.core.prefetch: the worker's value or exception reaches the caller."""

import threading

import pytest

from qie.core.prefetch import Prefetch


def test_the_value_comes_from_another_thread():
    job = Prefetch(lambda: threading.current_thread().name, name="qie-test")
    assert job.result() == "qie-test"


def test_the_exception_is_raised_by_result_and_not_by_wait():
    job = Prefetch(int, "not a number")
    job.wait()
    with pytest.raises(ValueError, match="not a number"):
        job.result()
