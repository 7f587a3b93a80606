"""The oracle helper: an option's output against the stock diffusers reference, within its tolerance."""

from __future__ import annotations

from qie.core.tolerances import TOLERANCES, Difference, difference


def assert_matches_reference(option: str, candidate, reference) -> Difference:
    """Assert `candidate` (an image) is within the tolerance `option` declares in `qie.core.tolerances.TOLERANCES`."""
    assert option in TOLERANCES, f"option {option!r} declares no tolerance in qie.core.tolerances.TOLERANCES"
    tol = TOLERANCES[option]
    diff = difference(candidate, reference)
    assert diff.within(tol), f"{option}: {diff} is outside {tol}"
    return diff
