"""The VAE's causal 3-D convolutions on one frame as 2-D convolutions: same outputs, no 3-D convolution."""

import copy

import pytest
import torch
from conftest import small_request
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d
from oracle import assert_installed_option_within

from qie.speed import vae_frames


@pytest.mark.parametrize(
    ("kernel", "padding", "stride"),
    [(3, 1, 1), (1, 0, 1), ((3, 1, 1), (1, 0, 0), 1), (3, 1, (1, 2, 2)), ((3, 5, 3), (1, 2, 1), 1)],
)
def test_one_frame_equals_the_causal_3d_convolution(kernel, padding, stride):
    torch.manual_seed(0)
    conv = QwenImageCausalConv3d(6, 5, kernel, stride=stride, padding=padding)
    patched = copy.deepcopy(conv)
    assert vae_frames.install(patched) == 1
    x = torch.randn(2, 6, 1, 17, 12)
    with torch.no_grad():
        want, got = conv(x), patched(x)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_frames_and_cached_chunks_take_diffusers_path_unchanged(monkeypatch):
    torch.manual_seed(0)
    conv = QwenImageCausalConv3d(4, 4, 3, padding=1)
    patched = copy.deepcopy(conv)
    vae_frames.install(patched)
    video, cache = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 4, 2, 8, 8)
    with torch.no_grad():
        assert torch.equal(patched(video), conv(video))
        assert torch.equal(patched(video[:, :, :1], cache), conv(video[:, :, :1], cache))


def test_temporal_strides_and_other_paddings_are_left_alone():
    assert not vae_frames.eligible(QwenImageCausalConv3d(4, 4, (3, 1, 1), stride=(2, 1, 1)))
    assert not vae_frames.eligible(torch.nn.Conv3d(4, 4, 3, padding=1))  # not causal: pads both ends
    conv = QwenImageCausalConv3d(4, 4, 3, padding=1)
    conv._padding = (1, 1, 1, 1, 1, 0)  # front padding shorter than the kernel: two output frames
    assert not vae_frames.eligible(conv)


def test_the_vae_decodes_and_encodes_an_image_without_3d_convolutions(tiny_editor, monkeypatch):
    vae = tiny_editor.pipe.vae
    patched = copy.deepcopy(vae)
    count = vae_frames.install(patched)
    causal = [m for m in vae.modules() if isinstance(m, QwenImageCausalConv3d)]
    assert count == sum(m.stride[0] == 1 for m in causal) > 0  # all but the encoder's temporal downsamplers
    assert vae_frames.install(patched) == 0  # once only
    torch.manual_seed(0)
    latents = torch.randn(1, vae.config.z_dim, 1, 16, 16)
    pixels = torch.rand(1, 3, 1, 64, 48) * 2 - 1
    with torch.no_grad():
        want_image = vae.decode(latents, return_dict=False)[0]
        want_latents = vae.encode(pixels).latent_dist.mode()
        calls = []
        conv3d = torch.nn.functional.conv3d
        monkeypatch.setattr(torch.nn.functional, "conv3d", lambda *a, **k: calls.append(1) or conv3d(*a, **k))
        got_image = patched.decode(latents, return_dict=False)[0]
        got_latents = patched.encode(pixels).latent_dist.mode()
    assert calls == []
    assert torch.allclose(got_image, want_image, atol=1e-5)
    assert torch.allclose(got_latents, want_latents, atol=1e-5)
    vae_frames.uninstall(patched)
    assert all(type(m) is QwenImageCausalConv3d for m in patched.modules() if isinstance(m, torch.nn.Conv3d))


def test_an_edit_with_single_frame_convolutions_stays_within_its_tolerance(tiny_editor, photo):
    request = small_request(photo, seed=4, steps=2)
    vae = tiny_editor.pipe.vae
    assert_installed_option_within(
        "vae-single-frame", tiny_editor, request, vae, vae_frames.install, vae_frames.uninstall
    )
