import pytest

from qie.core.geometry import DEFAULT_AREA, fit_area, output_size


@pytest.mark.parametrize("size", [(600, 400), (451, 300), (1000, 1000), (3000, 4000), (500, 2000), (1920, 1080)])
def test_default_size_keeps_aspect_at_1024_area_in_multiples_of_32(size):
    w, h = output_size(size)
    assert w % 32 == 0 and h % 32 == 0
    assert w * h <= DEFAULT_AREA * 1.03  # "~1024²": rounding to the nearest multiple of 32
    assert abs(w / h - size[0] / size[1]) / (size[0] / size[1]) < 0.05


def test_max_side_caps_and_keeps_aspect():
    w, h = output_size((600, 400), max_side=512)
    assert max(w, h) <= 512 and w % 32 == 0 and h % 32 == 0
    assert abs(w / h - 1.5) < 0.1


def test_fit_area_never_exceeds_max_side():
    for side in (64, 100, 128, 200, 333):
        assert max(fit_area(1600, 900, max_side=side)) <= side


@pytest.mark.parametrize("max_side", [96, 384])
def test_extreme_aspect_with_small_max_side_says_so_and_what_to_do(max_side):
    from qie import InvalidRequestError

    with pytest.raises(InvalidRequestError) as err:
        output_size((20000, 1250), max_side=max_side)
    assert err.value.param == "max_side" and err.value.value == max_side
    assert "aspect ratio (16.0:1) is too extreme" in str(err.value)
    assert "raise max_side to at least 1024" in str(err.value)
    assert output_size((20000, 1250), max_side=1024) == (1024, 64)  # the advice works


@pytest.mark.parametrize("area", [-1, 0, [1], 0.5, True, 2048 * 2048 + 1])
def test_area_is_checked(area):
    from qie import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="area="):
        output_size((600, 400), area=area)
