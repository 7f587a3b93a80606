"""Tiled VAE encode/decode with Hann blending (qie/memory/tiling.py) on the tiny VAE."""

import math

import pytest
import torch

from qie import EditRequest, InvalidRequestError
from qie.memory.tiling import Tiling, axis_weights, tile_spans, tiled_decode, tiled_encode

TILE, OVERLAP = 128, 32  # small tiles so a 256 x 192 image has 3 x 2 of them
HEIGHT, WIDTH = 192, 256
Z_DIM = 16


def stripes() -> torch.Tensor:
    """Hard-edged diagonal-ish checker stripes (periods 22 and 26 px: no edge on a tile border), (1, 3, 1, H, W)."""
    y, x = torch.meshgrid(torch.arange(HEIGHT), torch.arange(WIDTH), indexing="ij")
    pattern = (((x + 5) // 11 + (y + 3) // 13) % 2).float() * 1.6 - 0.8
    return torch.stack([pattern, -pattern, 0.5 * pattern])[None, :, None]


@pytest.fixture(scope="module")
def decoded(tiny_editor):
    """Latents of the stripes, decoded whole, in Hann-blended tiles and in plainly averaged tiles."""
    vae = tiny_editor.pipe.vae
    with torch.inference_mode():
        moments = vae._encode(stripes())
        z = moments[:, :Z_DIM]
        return {
            "moments": moments,
            "whole": vae.decode(z).sample[0, :, 0],
            "hann": tiled_decode(vae, z, TILE, OVERLAP)[0, :, 0],
            "flat": tiled_decode(vae, z, TILE, OVERLAP, window="flat")[0, :, 0],
        }


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 2.0) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def border_bands(length: int) -> torch.Tensor:
    """True on the pixels (of a `length`-pixel axis) that two tiles share."""
    spans = tile_spans(length // 8, TILE // 8, OVERLAP // 8)
    band = torch.zeros(length, dtype=torch.bool)
    for (_, prev_end), (start, _) in zip(spans, spans[1:], strict=False):
        band[start * 8 : prev_end * 8] = True
    return band


def seam_strength(error: torch.Tensor, axis: int) -> tuple[float, float]:
    """Largest jump of the error between neighbouring pixel lines, in the shared bands and elsewhere.

    A seam is a step in the error where one tile's contribution starts or stops; a smooth blend
    leaves the error as smooth across a band as inside a tile.
    """
    jumps = error.diff(dim=axis).abs().mean(dim=(0, 3 - axis))  # per line boundary
    band = border_bands(error.shape[axis])
    at_band = band[1:] | band[:-1]  # a jump touching a band
    return float(jumps[at_band].max()), float(jumps[~at_band].max())


@pytest.mark.slow
def test_tiled_decode_agrees_with_whole_decode(decoded):
    diff = decoded["hann"] - decoded["whole"]
    # Measured on the tiny VAE with 128-px tiles: 42.9 dB, max error 0.15 of the [-1, 1] range
    # (plain averaging of the same tiles: 36.2 dB, 0.32).
    assert psnr(decoded["hann"], decoded["whole"]) >= 38.0
    assert float(diff.abs().max()) <= 0.25
    assert decoded["hann"].shape == decoded["whole"].shape == (3, HEIGHT, WIDTH)


@pytest.mark.parametrize("axis", [1, 2], ids=["rows", "columns"])
def test_hann_blend_leaves_no_seam_and_plain_averaging_does(decoded, axis):
    hann_band, hann_inside = seam_strength(decoded["hann"] - decoded["whole"], axis)
    flat_band, flat_inside = seam_strength(decoded["flat"] - decoded["whole"], axis)
    # Measured (rows, columns): Hann 0.18x and 0.45x the largest jump inside the tiles; plain
    # averaging 1.6x and 3.2x, and 10x the Hann blend's.
    # No seam: the error changes no faster across the tile borders than inside the tiles.
    assert hann_band <= 1.0 * hann_inside, (hann_band, hann_inside)
    # The blend matters: averaging the same tiles leaves a step at each band's edge.
    assert flat_band >= 1.25 * flat_inside, (flat_band, flat_inside)
    assert flat_band >= 3.0 * hann_band, (flat_band, hann_band)
    # The mean error in the shared bands is at most 1.5x the mean error elsewhere (measured 1.0x
    # and 1.2x; plain averaging 1.5x and 2.0x).
    error = (decoded["hann"] - decoded["whole"]).abs().mean(dim=(0, 3 - axis))
    band = border_bands(error.shape[0])
    assert float(error[band].mean()) <= 1.5 * float(error[~band].mean())


@pytest.mark.slow
def test_tiled_encode_agrees_with_whole_encode(tiny_editor, decoded):
    vae = tiny_editor.pipe.vae
    with torch.inference_mode():
        moments = tiled_encode(vae, stripes(), TILE, OVERLAP)
        whole, tiled = decoded["moments"][:, :Z_DIM], moments[:, :Z_DIM]
        assert tiled.shape == whole.shape == (1, Z_DIM, 1, HEIGHT // 8, WIDTH // 8)
        snr = 10 * math.log10(float((whole**2).mean()) / float(((tiled - whole) ** 2).mean()))
        # Measured: 27.5 dB in latent space, and 57 dB between the two latents' decodes.
        assert snr >= 22.0
        assert psnr(vae.decode(tiled).sample, vae.decode(whole).sample) >= 45.0


def test_hann_weights_add_up_to_one():
    spans = tile_spans(100, 40, 8)
    assert spans == [(0, 40), (30, 70), (60, 100)]
    total = torch.zeros(100, dtype=torch.float64)
    for (start, end), w in zip(spans, axis_weights(spans), strict=True):
        total[start:end] += w
        assert float(w.min()) > 0  # no pixel of a tile is thrown away, so the sum never divides by 0
    assert torch.allclose(total, torch.ones(100, dtype=torch.float64), atol=1e-12)
    flat = torch.zeros(100, dtype=torch.float64)
    for (start, end), w in zip(spans, axis_weights(spans, window="flat"), strict=True):
        flat[start:end] += w
    assert float(flat.max()) == 2.0  # plain averaging has to divide out


def test_diffusers_tiling_is_off_during_a_tiled_call_and_restored(tiny_editor):
    vae = tiny_editor.pipe.vae
    vae.enable_tiling()
    try:
        with torch.inference_mode():
            out = tiled_decode(vae, torch.zeros(1, Z_DIM, 1, 8, 16), 64, 16)
        assert out.shape == (1, 3, 1, 64, 128)
        assert vae.use_tiling
    finally:
        vae.disable_tiling()


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tile_size": 100}, "tile_size"),
        ({"tile_size": 32}, "tile_size"),
        ({"tile_size": 8192}, "tile_size"),
        ({"tile_size": 256, "tile_overlap": 12}, "tile_overlap"),
        ({"tile_size": 256, "tile_overlap": 160}, "tile_overlap"),
    ],
)
def test_bad_tiling_is_refused_with_the_fix(photo, kwargs, param):
    with pytest.raises(InvalidRequestError, match=f"^{param}=") as err:
        EditRequest(images=[photo], prompt="x", **kwargs)
    assert err.value.param == param and "give a multiple of" in err.value.fix


def test_tiling_settings_reach_the_request(photo):
    request = EditRequest(images=[photo], prompt="x", tile_size=512)
    assert request.tiling == Tiling(512, 32)
    assert request.parameters()["tile_size"] == 512
    assert EditRequest(images=[photo], prompt="x").tiling is None
