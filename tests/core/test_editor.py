"""End to end through `Editor` on the tiny pipeline."""

import threading

import numpy as np
import pytest
import torch
from conftest import small_request
from PIL import Image

from qie import BusyError, CancelledError


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_edit_end_to_end(tiny_editor, photo):
    result = tiny_editor.edit(small_request(photo))
    assert result.image.size == (128, 96)
    assert result.image.mode == "RGB"
    assert set(result.timings) == {"text_encode", "condition_encode", "denoise", "decode"}
    assert all(t >= 0 for t in result.timings.values())
    assert result.peak_vram_gib is None  # CPU
    assert result.model == "tiny" and result.plan == "resident" and result.steps_run == 3
    assert "seed 1" in result.summary()


@pytest.mark.slow
def test_same_seed_same_pixels_other_seed_differs(tiny_editor, photo):
    a = tiny_editor.edit(small_request(photo, seed=5)).image
    b = tiny_editor.edit(small_request(photo, seed=5)).image
    c = tiny_editor.edit(small_request(photo, seed=6)).image
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


def test_resize_to_input(tiny_editor, photo):
    result = tiny_editor.edit(small_request(photo, resize_to_input=True))
    assert result.image.size == photo.size


def test_progress_callback_counts_steps(tiny_editor, photo):
    seen = []
    tiny_editor.edit(small_request(photo, steps=4), on_step=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_cancel_stops_and_editor_stays_usable(tiny_editor, photo):
    cancel = threading.Event()

    def stop_after_first(i, n):
        cancel.set()

    with pytest.raises(CancelledError, match="after 1 of 5 steps"):
        tiny_editor.edit(small_request(photo, steps=5), on_step=stop_after_first, cancel=cancel)
    assert not tiny_editor.lock.locked()
    assert tiny_editor.edit(small_request(photo)).image.size == (128, 96)


def test_busy_when_lock_held(tiny_editor, photo):
    request = small_request(photo)
    with tiny_editor.lock, pytest.raises(BusyError, match="busy"):
        tiny_editor.edit(request, timeout=0.05)


@pytest.mark.slow
def test_multi_image_edit(tiny_editor, photo):
    from PIL import Image

    other = Image.new("RGB", (300, 300), (0, 0, 255))
    result = tiny_editor.edit(_two(photo, other))
    assert result.image.size == (128, 128)  # framed like the last image


def _two(first, second):
    from qie import EditRequest

    return EditRequest(
        images=[first, second],
        prompt="put the cup on the blue cloth",
        steps=2,
        seed=0,
        max_side=128,
        condition_area="output",
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoded_pixels_reach_pil_exactly_as_diffusers_makes_them(dtype):
    from diffusers.image_processor import VaeImageProcessor

    from qie.core.stages import to_pil

    processor = VaeImageProcessor(vae_scale_factor=16)
    torch.manual_seed(0)
    image = (torch.randn(2, 3, 48, 32) * 0.7).to(dtype)
    image[0, 0, 0, :5] = torch.tensor([-1.5, 1.5, 1 / 255, -1 + 1 / 255, 0.5])  # clamped, and halfway cases
    got = to_pil(processor, image)
    want = processor.postprocess(image, output_type="pil")[0]
    assert got.size == want.size == (32, 48) and got.mode == want.mode == "RGB"
    assert list(got.getdata()) == list(want.getdata())


def _layout(tensor: torch.Tensor) -> list[int]:
    return [stride for stride, size in zip(tensor.stride(), tensor.shape, strict=True) if size > 1]


def _processor_cases():
    rng = np.random.default_rng(7)
    noisy = Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8))
    return [(noisy, 96, 64), (noisy, 90 // 16 * 16, 70 // 16 * 16), (noisy.resize((64, 48)), 48, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_pixels_reach_the_vae_exactly_as_diffusers_makes_them(dtype):
    from diffusers.image_processor import VaeImageProcessor

    from qie.core.stages import to_pixels

    processor = VaeImageProcessor(vae_scale_factor=16)
    cpu = torch.device("cpu")
    for image, height, width in _processor_cases():
        got = to_pixels(processor, image, height, width, device=cpu, dtype=dtype)
        want = processor.preprocess(image, height, width).unsqueeze(2).to(dtype=dtype)
        assert got.shape == want.shape == (1, 3, 1, height, width)
        assert torch.equal(got, want)
        assert _layout(got) == _layout(want)  # the same memory layout: the VAE's kernels see the same input
    gray = Image.new("L", (32, 32), 80)  # not RGB: diffusers' own path
    assert torch.equal(
        to_pixels(processor, gray, 32, 32, device=cpu, dtype=dtype),
        processor.preprocess(gray, 32, 32).unsqueeze(2).to(dtype=dtype),
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_pixels_both_ways_equal_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    from qie.core.stages import to_pil, to_pixels

    processor = VaeImageProcessor(vae_scale_factor=16)
    cuda = torch.device("cuda")
    for image, height, width in _processor_cases():
        got = to_pixels(processor, image, height, width, device=cuda, dtype=torch.bfloat16)
        want = processor.preprocess(image, height, width).unsqueeze(2).to(device=cuda, dtype=torch.bfloat16)
        assert torch.equal(got, want) and _layout(got) == _layout(want)
        decoded = got[:, :, 0] * 1.37 - 0.2  # out of range in places: clamped
        assert list(to_pil(processor, decoded).getdata()) == list(
            processor.postprocess(decoded, output_type="pil")[0].getdata()
        )


def test_the_condition_is_encoded_before_the_prompt_and_as_diffusers_encodes_it(tiny_editor, photo):
    """The VAE encode comes first (on a GPU it runs while the host prepares the text encoder's images),
    with the latent statistics made once per device and dtype; latents equal diffusers' bit for bit."""
    from qie.core.stages import _encode_latents, _latent_stats, to_pixels

    result = tiny_editor.edit(small_request(photo, steps=2))
    assert list(result.timings)[:2] == ["condition_encode", "text_encode"]
    pipe = tiny_editor.pipe
    pixels = to_pixels(pipe.image_processor, photo, 64, 64, device=torch.device("cpu"), dtype=torch.float32)
    with torch.inference_mode():
        assert torch.equal(_encode_latents(pipe.vae, pixels), pipe._encode_vae_image(pixels, generator=None))
    like = torch.zeros(1, 1, dtype=torch.float32)
    assert _latent_stats(pipe.vae, like)[0] is _latent_stats(pipe.vae, like)[0]  # kept, not rebuilt


def test_an_edit_releases_the_pipelines_hooks_only_where_diffusers_has_work_for_it(tiny_editor, photo, monkeypatch):
    """`maybe_free_model_hooks` walks every module; an edit calls it only for offload hooks or a step cache left on."""
    from qie.core.editor import release_hooks

    pipe = tiny_editor.pipe
    calls = []
    monkeypatch.setattr(type(pipe), "maybe_free_model_hooks", lambda self: calls.append("freed"))
    tiny_editor.edit(small_request(photo, steps=2))
    assert calls == []
    monkeypatch.setattr(pipe, "_all_hooks", ["offload hook"], raising=False)  # as enable_model_cpu_offload leaves
    release_hooks(pipe)
    assert calls == ["freed"]
    monkeypatch.setattr(pipe, "_all_hooks", [], raising=False)
    monkeypatch.setattr(pipe.transformer, "_cache_config", object(), raising=False)  # a step cache left on
    release_hooks(pipe)
    assert calls == ["freed", "freed"]
