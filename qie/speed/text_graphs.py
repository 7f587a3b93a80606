"""The text encoder's language model replayed as a CUDA graph, one per padded prompt length.

Qwen2.5-VL-7B's 28 language-model layers launch hundreds of small kernels for a prompt of a few
hundred tokens; launching them takes the host longer than the GPU takes to run them.
`install` gives the language model a forward that pads the prompt at its end to a multiple of
`BUCKET` tokens, copies it into fixed buffers and replays a CUDA graph of the layers recorded for
that length (recorded at its first use). Attention is causal, so a prompt
token never sees the padding: its hidden state is the unpadded one up to the rounding of matrix
products of another height (tolerance "text-graphs").

Only calls a graph can replay take this path: on CUDA, under `torch.inference_mode` (as edits
run), one prompt, no attention mask (every token real), no KV cache (not `generate`), no per-layer
outputs asked for, every weight on the GPU with no offloading hook. Every other call runs
transformers' own forward. Graphs are kept per length and per weight addresses: weights moved,
quantized or replaced record new graphs (the old ones are dropped), so a plan change never replays
stale weights. The forward is set on the model instance (`TextGraphs.forward`); its class stays.

Example:
    >>> install(pipe.text_encoder)  # doctest: +SKIP
    1
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qie.speed.cuda_graphs import gpu_weights, warm_up_and_record

log = logging.getLogger(__name__)

BUCKET = 64  # prompt lengths are padded to a multiple of this many tokens
MAX_TOKENS = 1024  # longer prompts run eagerly (the pipeline's own limit, `stages.MAX_PROMPT_TOKENS`)


def bucket(length: int) -> int:
    """The padded length a prompt of `length` tokens replays at.

    Example:
        >>> bucket(1), bucket(64), bucket(65)
        (64, 64, 128)
    """
    return -(-length // BUCKET) * BUCKET


def run_layers(model: nn.Module, embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The language model's layers and final norm on `embeds` at the 3-D M-RoPE `position_ids` (3, 1, L),
    no mask, no cache: what its forward computes for that call, as the graph records it."""
    position_embeddings = model.rotary_emb(embeds, position_ids)
    hidden = embeds
    for layer in model.layers:
        hidden = layer(
            hidden,
            attention_mask=None,
            position_embeddings=position_embeddings,
            position_ids=None,
            past_key_values=None,
            use_cache=False,
        )
    return model.norm(hidden)


def default_positions(length: int, device: torch.device) -> torch.Tensor:
    """The (3, 1, `length`) positions the forward uses when given none: 0..length-1 on every axis."""
    return torch.arange(length, device=device).view(1, 1, -1).expand(3, 1, -1)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    embeds: torch.Tensor  # (1, bucket, hidden) input buffer
    positions: torch.Tensor  # (3, 1, bucket) input buffer
    out: torch.Tensor  # (1, bucket, hidden) output, in the graphs' memory pool


class TextGraphs:
    """The CUDA graphs of one language model, and the forward `install` gives it (see the module doc).

    The forward is set on the model itself (its class stays, so transformers' per-class output capture
    still serves the calls that fall through to the class's own forward).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.graphs: dict[tuple, _Graph] = {}
        self.weights: tuple[int, ...] = ()  # the weight addresses the graphs were recorded with
        self.pool: Any = None
        self.disabled = False  # set when recording failed: every call runs the class's forward

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ):
        args = (input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache, kwargs)
        if self.replayable(*args) and (weights := gpu_weights(self.model)) is not None:
            from transformers.modeling_outputs import BaseModelOutputWithPast

            try:
                return BaseModelOutputWithPast(last_hidden_state=self.replay(inputs_embeds, position_ids, weights))
            except Exception as exc:  # a build whose layers cannot be captured: eager from now on, said once
                self.disabled = True
                self.graphs.clear()
                log.warning("text encoder: CUDA graphs off (%s: %s); running eager", type(exc).__name__, exc)
        return type(self.model).forward(
            self.model,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )

    def replayable(self, input_ids, attention_mask, position_ids, past_key_values, embeds, use_cache, kwargs) -> bool:
        """Whether a graph can serve a call with these arguments (see the module doc; the weights are checked
        by `gpu_weights`); otherwise the class's forward does."""
        if self.disabled:
            return False
        if input_ids is not None or embeds is None or attention_mask is not None or past_key_values is not None:
            return False
        if use_cache or any(value for key, value in kwargs.items() if key != "return_dict"):
            return False  # per-layer outputs (hidden states, attentions) or options the graph does not take
        if not embeds.is_cuda or embeds.shape[0] != 1 or embeds.shape[1] > MAX_TOKENS:
            return False
        if not torch.is_inference_mode_enabled():  # the buffers are inference tensors, as in an edit
            return False
        if position_ids is not None and position_ids.shape != (3, 1, embeds.shape[1]):
            return False  # 4 rows: packed sequences, whose mask the forward builds from the text positions
        return not (torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling())

    def replay(self, embeds: torch.Tensor, position_ids: torch.Tensor | None, weights: tuple[int, ...]) -> torch.Tensor:
        """The last hidden state of `embeds` from the graph of its padded length (recorded if new); `weights`
        are the model's weight addresses now (`gpu_weights`)."""
        length = embeds.shape[1]
        if position_ids is None:
            position_ids = default_positions(length, embeds.device)
        if weights != self.weights:  # weights moved or replaced since the graphs were recorded
            self.graphs.clear()
            self.weights, self.pool = weights, None
        key = (bucket(length), embeds.shape[-1], embeds.dtype, embeds.device)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._record(*key)
        graph.embeds[:, :length].copy_(embeds)
        graph.embeds[:, length:].zero_()
        graph.positions[..., :length].copy_(position_ids)
        graph.graph.replay()
        return graph.out[:, :length].clone()  # the buffer is the next replay's

    def _record(self, padded: int, width: int, dtype: torch.dtype, device: torch.device) -> _Graph:
        embeds = torch.zeros(1, padded, width, dtype=dtype, device=device)
        positions = default_positions(padded, device).contiguous()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.device(device):
            graph, out = warm_up_and_record(lambda: run_layers(self.model, embeds, positions), self.pool)
        log.info("text encoder: recorded the language model's CUDA graph for prompts of up to %d tokens", padded)
        return _Graph(graph, embeds, positions, out)


def _eligible(module: nn.Module) -> bool:
    if hasattr(module, "_qie_text_graphs") or not type(module).__name__.endswith("TextModel"):
        return False
    if not all(hasattr(module, name) for name in ("layers", "rotary_emb", "norm", "config")):
        return False
    config = module.config
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ["full_attention"]):
        return False  # sliding-window layers take a mask of their own
    return getattr(config, "_attn_implementation", None) == "sdpa"


def install(text_encoder: nn.Module) -> int:
    """Give the language model of `text_encoder` the graph-replaying forward; how many modules changed."""
    changed = 0
    for module in text_encoder.modules():
        if _eligible(module):
            module._qie_text_graphs = graphs = TextGraphs(module)
            module.forward = graphs.forward
            changed += 1
    if changed:
        log.info("text encoder: the language model replays CUDA graphs at padded prompt lengths")
    return changed


def graphs_of(text_encoder: nn.Module) -> TextGraphs | None:
    """The `TextGraphs` `install` gave `text_encoder`'s language model, if any."""
    return next((m._qie_text_graphs for m in text_encoder.modules() if hasattr(m, "_qie_text_graphs")), None)


def uninstall(text_encoder: nn.Module) -> None:
    """Give the language model its class's forward back and free its graphs."""
    for module in text_encoder.modules():
        graphs = module.__dict__.pop("_qie_text_graphs", None)
        if graphs is not None and module.__dict__.get("forward") == graphs.forward:
            del module.forward
