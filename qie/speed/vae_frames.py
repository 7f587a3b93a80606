"""The VAE's causal 3-D convolutions on a single frame, as the 2-D convolutions they amount to.

Qwen-Image's VAE (`AutoencoderKLQwenImage`) is a video VAE: each of its convolutions is a
`QwenImageCausalConv3d` with a temporal kernel of 3 (or 1) that pads the time axis with zero
frames in front. An image is one frame, so every such call pads 1 frame to 3 (a copy of the
activation three times its size) and runs a 3-D convolution in which two of the three temporal
kernel slices only ever multiply zeros. The output frame equals a 2-D convolution of the one real
frame with the last temporal slice of the kernel, which is what `install` makes these modules
run (a 3-D kernel of depth k, front-padded by k - 1 frames, at stride 1: the real frame meets slice k - 1).

Anything else goes to diffusers' own forward: more than one frame, a cached previous chunk
(video), strides or dilations in time, other paddings. The products are the same; cuDNN sums them
in another order, so the outputs move by float rounding (tolerance "vae-single-frame"). Applied
at load on CUDA (`qie.core.speed_setup.setup_speed`); `uninstall` restores diffusers' forward.

Example:
    >>> install(pipe.vae)  # doctest: +SKIP
    70
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from qie.speed.mixins import mix_in, mix_out


class SingleFrameConv(nn.Conv3d):
    """A diffusers causal 3-D convolution that runs a lone frame as a 2-D convolution (see the module doc)."""

    _padding: tuple[int, ...]  # diffusers' causal padding: (w, w, h, h, 2 * t, 0), as `F.pad` takes it

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        if cache_x is not None or x.dim() != 5 or x.shape[2] != 1:
            return super().forward(x, cache_x)
        left, right, top, bottom = self._padding[:4]
        weight = self.weight[:, :, -1]  # the slice that meets the real frame; cuDNN copies the view
        out = F.conv2d(x[:, :, 0], weight, self.bias, self.stride[1:], (top, left), self.dilation[1:], self.groups)
        return out.unsqueeze(2)


@functools.cache
def _single_frame_class(base: type) -> type:
    return type(f"SingleFrame{base.__name__}", (SingleFrameConv, base), {})


def eligible(module: nn.Module) -> bool:
    """Whether `module` is a causal 3-D convolution whose single-frame output is one 2-D convolution.

    Example:
        >>> from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d
        >>> eligible(QwenImageCausalConv3d(4, 4, 3, padding=1)), eligible(nn.Conv3d(4, 4, 3))
        (True, False)
    """
    if not isinstance(module, nn.Conv3d) or isinstance(module, SingleFrameConv):
        return False
    pad = getattr(module, "_padding", None)
    if not isinstance(pad, tuple) or len(pad) != 6 or module.padding_mode != "zeros":
        return False
    depth = module.kernel_size[0]
    return (
        module.stride[0] == 1
        and module.dilation[0] == 1
        and tuple(module.padding) == (0, 0, 0)  # all padding is the causal `_padding`
        and pad[4] == depth - 1  # front-padded so the output has as many frames as the input
        and pad[5] == 0
        and pad[0] == pad[1]
        and pad[2] == pad[3]  # symmetric in space: conv2d's own padding
    )


def install(vae: nn.Module) -> int:
    """Make each eligible causal convolution of `vae` run lone frames as 2-D convolutions; how many changed."""
    message = "VAE: %d causal 3-D convolutions run single frames as 2-D convolutions"
    return mix_in(vae, eligible, _single_frame_class, message)


def uninstall(vae: nn.Module) -> None:
    """Give the convolutions diffusers' own forward back."""
    mix_out(vae, SingleFrameConv)
