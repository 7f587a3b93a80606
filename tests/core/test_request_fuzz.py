"""Property-based fuzzing of `EditRequest`: any value in any field gives a request or a named
`InvalidRequestError`, never another exception."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qie.core.request import EditRequest
from qie.errors import InvalidRequestError

IMAGE = Image.new("RGB", (96, 64), (200, 30, 30))
FIELDS = [f.name for f in dataclasses.fields(EditRequest) if f.name not in ("images", "prompt")]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-2, max_value=5000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=16),
    st.sampled_from(["fast", "quality", "output", "fbcache", "taylorseer", "int8", "hann"]),
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip


def build(**fields):
    try:
        return EditRequest(images=[IMAGE], prompt="make it blue", **{"steps": 2, "max_side": 128, **fields})
    except InvalidRequestError as exc:
        assert exc.param and exc.fix, exc
        return exc


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(FIELDS), value=VALUES)
def test_any_value_in_one_field_is_accepted_or_named(name, value):
    outcome = build(**{name: value})
    if isinstance(outcome, InvalidRequestError):
        assert outcome.param.split("[")[0].split(" ")[0] in (name, "width", "height", "max_side", "area", "box")


@settings(max_examples=200, deadline=None)
@given(fields=st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=4))
def test_any_values_in_several_fields_are_accepted_or_named(fields):
    build(**fields)


@settings(max_examples=100, deadline=None)
@given(images=VALUES, prompt=VALUES)
def test_any_images_and_prompt_are_accepted_or_named(images, prompt):
    try:
        EditRequest(images=images, prompt=prompt)
    except InvalidRequestError as exc:
        assert exc.param.split("[")[0] in ("images", "prompt"), exc
