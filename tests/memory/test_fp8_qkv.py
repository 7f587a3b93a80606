"""Each attention stream's q/k/v as one fp8 GEMM: the three layers' products, one weight copy."""

import copy
import importlib
from types import SimpleNamespace

import pytest
import torch

from qie.memory.fp8_matmul import Fp8RowLinear, quantize_rows, scaled_linear
from qie.memory.fp8_qkv import STREAMS, fuse_qkv, fuse_qkv_projections, project
from qie.speed import qk_prologue, rope

qwen = importlib.import_module(rope.QWEN_MODULE)


class RowsLinear(torch.nn.Linear):
    """A linear layer stored as torchao's rowwise fp8 tensor is (`weight.qdata`, `weight.scale`), multiplying
    as torchao's does: the input quantized per row, one scaled GEMM."""

    def forward(self, x):
        return scaled_linear(x, self.weight.qdata, self.weight.scale, self.bias)


def as_fp8_rows(linear: torch.nn.Linear) -> None:
    values, scales = quantize_rows(linear.weight.data)
    del linear.weight
    linear.weight = SimpleNamespace(qdata=values, scale=scales)
    linear.__class__ = RowsLinear


@pytest.fixture()
def transformer(tiny_editor):
    """A copy of the tiny transformer whose attention projections hold fp8 rows."""
    fresh = copy.deepcopy(tiny_editor.pipe.transformer)
    for block in fresh.transformer_blocks:
        for names in STREAMS.values():
            for name in names:
                as_fp8_rows(getattr(block.attn, name))
    yield fresh
    qk_prologue.uninstall(fresh)
    rope.uninstall(fresh)


def test_one_gemm_gives_the_three_layers_products_and_the_layers_become_views(transformer):
    attn = transformer.transformer_blocks[0].attn
    x = torch.randn(2, 9, transformer.inner_dim) * 3
    want = [getattr(attn, name)(x) for name in STREAMS["image"]]
    assert fuse_qkv(attn) == 2
    got = project(attn, "image", x)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and ((g - w).abs().max() / w.abs().max()).item() < 1e-6
    joined = attn.qie_image_qkv_values
    rows = joined.shape[0] // 3
    for i, name in enumerate(STREAMS["image"]):  # no second copy: each layer's rows lie in the joined matrix
        weight = getattr(attn, name).weight
        assert weight.qdata.data_ptr() == joined[i * rows].data_ptr()
        assert torch.equal(getattr(attn, name)(x), want[i])  # and the layer still computes what it did


def test_the_fused_processor_with_joined_projections_matches_the_three_layers(transformer):
    """The attention processor (fused q/k prologue) runs one GEMM per stream once joined; same output."""
    attn = transformer.transformer_blocks[0].attn
    torch.manual_seed(1)
    hidden, text = torch.randn(2, 16, transformer.inner_dim), torch.randn(2, 6, transformer.inner_dim)
    rotary = transformer.pos_embed([[(1, 4, 4)]], max_txt_seq_len=6, device=torch.device("cpu"))
    real = tuple(torch.view_as_real(f) for f in rotary)
    assert qk_prologue.install(transformer) == len(transformer.transformer_blocks)
    calls = []
    for name in (*STREAMS["image"], *STREAMS["text"]):
        getattr(attn, name).register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        want = attn(hidden_states=hidden, encoder_hidden_states=text, image_rotary_emb=real)
        assert len(calls) == 6
        assert fuse_qkv_projections(transformer) == 2 * len(transformer.transformer_blocks)
        got = attn(hidden_states=hidden, encoder_hidden_states=text, image_rotary_emb=real)
        assert len(calls) == 6  # no layer called: one joined GEMM per stream
    for w, g in zip(want, got, strict=True):
        assert w.shape == g.shape and ((g - w).abs().max() / w.abs().max()).item() < 1e-5


def test_layers_it_cannot_join_stay_as_they_are(tiny_editor):
    bf16 = copy.deepcopy(tiny_editor.pipe.transformer)
    assert fuse_qkv_projections(bf16) == 0  # bf16 weights
    attn = bf16.transformer_blocks[0].attn
    for name in STREAMS["image"]:
        layer = getattr(attn, name)
        values, scales = quantize_rows(layer.weight.data)
        Fp8RowLinear.to_fp8_rows(layer)
        layer.weight = torch.nn.Parameter(values, requires_grad=False)
        layer.weight_scale = scales
    assert fuse_qkv(attn) == 0  # the stream plan's storage: the streamer rebinds it per call
    assert project(attn, "image", torch.randn(1, 2, bf16.inner_dim)) is None


@pytest.mark.gpu
def test_on_a_gpu_torchao_weights_join_and_the_compiled_blocks_match():
    """Two full-width blocks, torchao fp8 + compile: joined q/k/v against three GEMMs, and no second copy."""
    pytest.importorskip("torchao")
    from diffusers import QwenImageTransformer2DModel

    from benchmarks.random_model import materialize
    from qie.memory.quantize import quantize_transformer
    from qie.speed.compile import compile_blocks

    device = torch.device("cuda")
    model = materialize(lambda: QwenImageTransformer2DModel(num_layers=2), device, torch.bfloat16, 3)
    assert quantize_transformer(model, device, fuse_qkv=False) == "fp8"
    gen = torch.Generator(device=device).manual_seed(0)
    kwargs = {
        "hidden_states": torch.randn(1, 2 * 32 * 32, 64, device=device, dtype=torch.bfloat16, generator=gen),
        "encoder_hidden_states": torch.randn(1, 200, 3584, device=device, dtype=torch.bfloat16, generator=gen),
        "timestep": torch.full((1,), 0.5, device=device, dtype=torch.bfloat16),
        "img_shapes": [[(1, 32, 32), (1, 32, 32)]],
        "return_dict": False,
    }
    outs = []
    for join in (False, True):
        torch._dynamo.reset()  # (the first compile's code holds the weights it was traced with)
        if join:
            before = torch.cuda.memory_allocated(device)
            assert fuse_qkv_projections(model) == 4
            assert torch.cuda.memory_allocated(device) - before < 2**20  # the old rows freed, only biases new
        compile_blocks(model)
        with torch.inference_mode():
            outs.append(model(**kwargs)[0].float())
    three, joined = outs
    assert ((joined - three).norm() / three.norm()).item() < 1e-2
