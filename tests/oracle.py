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


def assert_installed_option_within(option: str, editor, request, module, install, uninstall) -> Difference:
    """Edit `request` with `editor`, then again with `install(module)` in effect (it must change
    something), and assert the second image is within `option`'s tolerance of the first."""
    plain = editor.edit(request).image
    assert install(module), f"{option}: install changed nothing"
    try:
        changed = editor.edit(request).image
    finally:
        uninstall(module)
    return assert_matches_reference(option, changed, plain)
