"""The cost model: FLOP counts, which bound a plan hits, batched CFG's verdict, and the H200 measurements."""

import json
from pathlib import Path

import pytest

from qie.memory.cost import GPUS, forward_flops, predict_resident, predict_stream
from qie.memory.plans import FULL_SIZE, pick_plan, resident_blocks
from qie.memory.streaming import spread

BENCH = Path(__file__).parents[2] / "benchmarks"


def test_forward_flops_at_1024_match_the_published_count():
    linear, attention = forward_flops()
    assert 1.6e14 < linear + attention < 1.75e14  # ~1.7e14 per forward at 1024²
    assert 0.3 < attention / (linear + attention) < 0.33


def test_stream_is_pcie_bound_on_fast_gpus_and_compute_bound_on_slow_ones():
    assert predict_stream(GPUS["h200"], 16.8).bound == "pcie"
    assert predict_stream(GPUS["rtx4090"], 13.0).bound == "compute"
    slow = predict_stream(GPUS["h200"], 16.8)
    assert predict_stream(GPUS["h200"], 8.0).forward_s < slow.forward_s  # fewer bytes streamed, faster
    assert predict_stream(GPUS["rtx3090"], 1.9).compute_s > predict_stream(GPUS["rtx4090"], 1.9).compute_s


def test_batched_cfg_pays_only_when_copies_dominate_or_masks_are_free():
    h200 = GPUS["h200"]
    assert not predict_resident(h200, fp8=True).batch_cfg  # compute-bound: masked SDPA costs more
    assert not predict_stream(h200, 13.0).batch_cfg  # near balance, SDPA's masked attention loses
    assert predict_stream(h200, 16.8).batch_cfg  # copies dominate: weights once per step pays
    assert predict_stream(h200, 13.0, fa3=True).batch_cfg  # FA3: the mask costs nothing
    p = predict_stream(h200, 13.0, fa3=True)
    assert p.cfg_step_s == p.cfg_batched_s < p.cfg_two_calls_s


@pytest.mark.parametrize("name", ["bench-h200-a.json", "bench-h200-b.json"])
def test_predictions_land_within_15_percent_of_the_h200_measurements(name):
    data = json.loads((BENCH / name).read_text())
    rows = {r["name"]: r for r in data["rows"]}
    checked = 0
    for budget in data["budgets"]:
        measured = rows[f"qie auto @ {budget['budget_gib']:g} GiB"]
        fa3 = budget["attention"] == "fa3-fwd"
        if budget["plan"] == "stream":
            kept = spread(budget["resident_blocks"], 60)
            streamed = sum(size for i, size in enumerate(FULL_SIZE.blocks_fp8) if i not in kept)
            p = predict_stream(GPUS["h200"], streamed, fa3=fa3)
        else:
            p = predict_resident(GPUS["h200"], fp8=True, fa3=fa3)
        assert p.forward_s == pytest.approx(measured["step_s_nocfg"], rel=0.15)
        assert p.cfg_step_s == pytest.approx(measured["step_s_cfg"], rel=0.15)
        assert p.batch_cfg == budget["batch_cfg"] or budget["plan"] != "stream"
        checked += 1
    assert checked >= 2


def test_full_size_sizes_match_the_model_built_on_the_meta_device():
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from benchmarks.random_model import QWEN25_VL_7B_TEXT, QWEN25_VL_7B_VISION
    from qie.core.tiny import build_tokenizer, text_encoder_config
    from qie.memory.plans import measure_sizes

    with init_empty_weights():
        config = text_encoder_config(build_tokenizer(), QWEN25_VL_7B_TEXT, QWEN25_VL_7B_VISION)
        pipe = SimpleNamespace(
            transformer=QwenImageTransformer2DModel(),
            vae=AutoencoderKLQwenImage(),
            text_encoder=Qwen2_5_VLForConditionalGeneration(config),
        )
    sizes = measure_sizes(pipe)
    for field in ("transformer_rest", "text_encoder", "text_encoder_layer", "text_encoder_embed", "vae"):
        assert getattr(sizes, field) == pytest.approx(getattr(FULL_SIZE, field), rel=1e-3), field
    assert sizes.blocks == pytest.approx(FULL_SIZE.blocks, rel=1e-5)
    assert sizes.blocks_fp8 == pytest.approx(FULL_SIZE.blocks_fp8, rel=1e-5)


def test_a_budget_below_every_plan_names_the_smallest_that_works():
    from qie.errors import ResourceError

    with pytest.raises(ResourceError, match=r"vram_budget_gib=3: .* at least (\d+\.\d) GiB") as err:
        pick_plan(FULL_SIZE, 3.0)
    works = float(err.value.args[0].split("at least ")[1].split(" GiB")[0])
    assert pick_plan(FULL_SIZE, works).name == "stream"  # the named budget does work
    assert resident_blocks(FULL_SIZE, works) == 0


def test_the_stream_plan_itself_refuses_a_budget_it_cannot_meet(monkeypatch):
    from qie.errors import ResourceError
    from qie.memory.plans import PLANS

    monkeypatch.setattr("qie.memory.plans.measure_sizes", lambda pipe, **kw: FULL_SIZE)  # upcast: 4.3, not 3.7
    with pytest.raises(ResourceError, match="vram_budget_gib=2: .* at least 4.3 GiB"):
        PLANS["stream"].apply(None, __import__("torch").device("cpu"), 2.0)


def test_log_prediction_puts_the_predicted_step_beside_the_measured_one(monkeypatch, caplog):
    """The line `Editor` logs once after its first GPU edit (here fed a CPU edit's result and H100 rates)."""
    import logging

    import torch
    from PIL import Image

    from qie.core import editor as editor_module
    from qie.core.editor import Editor, log_prediction
    from qie.core.request import EditRequest
    from qie.memory import cost

    editor = Editor.load("tiny")
    calls = []
    monkeypatch.setattr(editor_module, "log_prediction", lambda *a: calls.append(a))
    request = EditRequest(images=[Image.new("RGB", (64, 64))], prompt="white background", steps=2, width=64, height=64)
    result = editor.edit(request)
    assert calls == []  # CPU edits log no GPU prediction
    monkeypatch.setattr(cost, "detect_gpu", lambda device, pcie_gbps=None: cost.GPUS["h100"])
    monkeypatch.setattr(editor, "device", torch.device("cuda"))
    with caplog.at_level(logging.INFO, logger="qie.core.editor"):
        log_prediction(editor, request, result)
    (line,) = [r.getMessage() for r in caplog.records if "predicted" in r.getMessage()]
    assert "plan resident" in line and "with CFG" in line and "over 2 steps" in line
