"""Blocks that hand fp8 rows to their projections: LayerNorm + modulation + quantization in one pass.

In diffusers' `QwenImageTransformerBlock.forward` each stream is normalized, modulated and then
quantized again inside every fp8 projection that reads it. `Fp8PrologueBlock.forward` is that
forward with the three steps as one op per stream and norm (`qie.memory.norm_quantize`): the q/k/v
projections (through `QwenFusedQKAttnProcessor`, `qie.speed.qk_prologue`) and the MLP's first layer
(`Fp8GeluFeedForward`) multiply the fp8 rows it wrote (`qie.memory.fp8_matmul.project`); the image
and text modulation layers run as one launch (`modulations`, `qie.memory.few_rows_gemm.silu_linears`). Before the
MLP the op also writes the gated residual sum after attention, which it normalizes; the residual sum
after the MLP stays as diffusers writes it. Edit-2511's per-token modulation (`modulate_index`,
`zero_cond_t`) is selected as in diffusers' `_modulate`.

`install` sets the class on blocks whose projections are all fp8 rows, whose MLPs are fused and whose
attention runs the fused q/k processor; `compile_blocks` calls it after the processor's install.
Calls the processor would hand to diffusers' own code (complex rotary frequencies), fp16 activations
(diffusers clips them) and calls with `joint_attention_kwargs` run diffusers' forward. Tolerance
``block-prologue-fused``.

Example:
    >>> install(pipe.transformer)  # after quantize_transformer and qk_prologue.install  # doctest: +SKIP
    60
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from qie.memory.few_rows_gemm import Rows, silu_linears, silu_linears_fusable
from qie.memory.fp8_matmul import fp8_rows
from qie.memory.fp8_mlp import Fp8GeluFeedForward
from qie.memory.norm_quantize import add_norm_modulate_quantize, norm_modulate_quantize
from qie.speed import qk_prologue
from qie.speed.mixins import mix_in, mix_out

PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def modulation(mod_params: torch.Tensor, index: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(shift, scale, gate) broadcastable against [B, T, D], as diffusers' `_modulate` selects them:
    [B, 1, D] each, or with `index` [B, T] per token (0: the first half of the batch's parameters)."""
    shift, scale, gate = mod_params.chunk(3, dim=-1)
    if index is None:
        return shift.unsqueeze(1), scale.unsqueeze(1), gate.unsqueeze(1)
    half = shift.size(0) // 2
    first = index.unsqueeze(-1) == 0
    return tuple(torch.where(first, p[:half].unsqueeze(1), p[half:].unsqueeze(1)) for p in (shift, scale, gate))


def _modulation_rows(mod: torch.nn.Module) -> Rows | None:
    """(fp8 values, scales, bias) of a diffusers modulation layer, `Sequential(SiLU, Linear)`, stored as fp8
    rows with a bias; else None."""
    if not isinstance(mod, torch.nn.Sequential) or len(mod) != 2 or not isinstance(mod[0], torch.nn.SiLU):
        return None
    rows = fp8_rows(mod[1])
    if rows is None or mod[1].bias is None:
        return None
    return rows[0], rows[1], mod[1].bias


def modulations(img_mod, txt_mod, temb: torch.Tensor, zero_cond_t: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`(img_mod(temb), txt_mod(temb))`, the text stream's from the first half of `temb`'s samples with
    `zero_cond_t` (Edit-2511, as diffusers' block does): one Triton launch (`silu_linears`) where both
    layers are fp8 rows with a bias and the kernel takes `temb` (`silu_linears_fusable`), else the layers.

    Example:
        >>> mod = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(8, 12))
        >>> img, txt = modulations(mod, mod, torch.randn(2, 8), zero_cond_t=True)
        >>> tuple(img.shape), tuple(txt.shape), torch.allclose(img[:1], txt)
        ((2, 12), (1, 12), True)
    """
    text_samples = temb.shape[0] // 2 if zero_cond_t else temb.shape[0]
    layers = (_modulation_rows(img_mod), _modulation_rows(txt_mod))
    if None not in layers and silu_linears_fusable(temb, *layers):  # the rows of one launch are independent
        img, txt = silu_linears(temb, *layers)
        return img, txt[:text_samples]
    return img_mod(temb), txt_mod(temb[:text_samples])


class Fp8PrologueBlock(torch.nn.Module):
    """Mixed into a diffusers Qwen-Image block's class by `install` (see the module docstring)."""

    def _rows(self, x: torch.Tensor, norm: torch.nn.LayerNorm, mod_params: torch.Tensor, index=None):
        shift, scale, gate = modulation(mod_params, index)
        return norm_modulate_quantize(x, shift, scale, norm.eps), gate

    def _sum_rows(self, x, gate, y, norm: torch.nn.LayerNorm, mod_params: torch.Tensor, index=None):
        shift, scale, next_gate = modulation(mod_params, index)
        summed, rows = add_norm_modulate_quantize(x, gate, y, shift, scale, norm.eps)
        return summed, rows, next_gate

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        modulate_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if (
            joint_attention_kwargs
            or hidden_states.dtype == torch.float16
            or not qk_prologue.fusable(self.attn, hidden_states, image_rotary_emb)
        ):  # diffusers' own forward
            return super().forward(
                hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb, image_rotary_emb,
                joint_attention_kwargs, modulate_index,
            )  # fmt: skip
        img_params, txt_params = modulations(self.img_mod, self.txt_mod, temb, self.zero_cond_t)
        img_mod1, img_mod2 = img_params.chunk(2, dim=-1)
        txt_mod1, txt_mod2 = txt_params.chunk(2, dim=-1)

        img_rows, img_gate1 = self._rows(hidden_states, self.img_norm1, img_mod1, modulate_index)
        txt_rows, txt_gate1 = self._rows(encoder_hidden_states, self.txt_norm1, txt_mod1)
        img_attn, txt_attn = self.attn(
            hidden_states=img_rows,
            encoder_hidden_states=txt_rows,
            encoder_hidden_states_mask=encoder_hidden_states_mask,
            image_rotary_emb=image_rotary_emb,
        )
        # the gated residual sums, each written out in the pass that normalizes it for the MLP
        hidden_states, img_rows, img_gate2 = self._sum_rows(
            hidden_states, img_gate1, img_attn, self.img_norm2, img_mod2, modulate_index
        )
        hidden_states = hidden_states + img_gate2 * self.img_mlp(img_rows)
        encoder_hidden_states, txt_rows, txt_gate2 = self._sum_rows(
            encoder_hidden_states, txt_gate1, txt_attn, self.txt_norm2, txt_mod2
        )
        encoder_hidden_states = encoder_hidden_states + txt_gate2 * self.txt_mlp(txt_rows)
        return encoder_hidden_states, hidden_states


@functools.cache
def _fused_class(base: type) -> type:
    """One class per block class, with the block class's own name: diffusers' `compile_repeated_blocks`
    finds the blocks by class name, and compiled blocks share their graph only if they share a class."""
    return type(base.__name__, (Fp8PrologueBlock, base), {})


def _ready(block: torch.nn.Module) -> bool:
    """Whether `block` is a joint-attention block every consumer of whose modulated rows takes fp8 rows as
    they are (other modules have no `attn` with the fused processor)."""
    attn = getattr(block, "attn", None)
    if attn is None or not isinstance(attn.processor, qk_prologue.processor_class()):
        return False
    if any(fp8_rows(getattr(attn, name, None)) is None for name in PROJECTIONS):
        return False
    mlps = (getattr(block, "img_mlp", None), getattr(block, "txt_mlp", None))
    if not all(isinstance(mlp, Fp8GeluFeedForward) and fp8_rows(mlp.net[0].proj) for mlp in mlps):
        return False
    norms = (block.img_norm1, block.txt_norm1, block.img_norm2, block.txt_norm2)
    return all(isinstance(n, torch.nn.LayerNorm) and n.weight is None and n.bias is None for n in norms)


def install(transformer: torch.nn.Module) -> int:
    """Give each ready block of `transformer` the fused prologue (`_ready`; `qie.speed.mixins` leaves blocks
    whose calls bypass their class alone); returns how many changed."""
    return mix_in(
        transformer,
        lambda m: not isinstance(m, Fp8PrologueBlock) and _ready(m),
        _fused_class,
        "block prologue: LayerNorm, modulation and fp8 quantization fused in %d blocks",
    )


def installed(transformer: torch.nn.Module) -> bool:
    """Whether `transformer`'s blocks run the fused prologue."""
    return any(isinstance(b, Fp8PrologueBlock) for b in getattr(transformer, "transformer_blocks", []))


def uninstall(transformer: torch.nn.Module) -> None:
    """Give each block its diffusers class back."""
    mix_out(transformer, Fp8PrologueBlock)
