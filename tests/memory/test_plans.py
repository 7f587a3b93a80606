"""The memory planner's choices, from component sizes (full-size numbers, no GPU needed)."""

import pytest
import torch

from qie import InvalidRequestError, ResourceError
from qie.memory.placement import onload_per_call
from qie.memory.plans import (
    PLANS,
    Sizes,
    choose_plan,
    measure_sizes,
    next_plan,
    resident_blocks,
    usable,
)

BLOCK_BF16 = 20.4e9 / 60 * 2 / 2**30
FULL = Sizes(
    blocks=[BLOCK_BF16] * 60,
    blocks_fp8=[BLOCK_BF16 / 2] * 60,
    transformer_rest=0.1,
    text_encoder=15.5,
    text_encoder_layer=0.435,
    text_encoder_embed=1.01,
    vae=0.24,
)


def test_needs_are_ordered_by_memory():
    need = {name: plan.need_gib(FULL) for name, plan in PLANS.items()}
    assert need["resident"] > need["resident-fp8"] > need["fp8-te-stream"] > need["stream"]
    # the measured resident peak at 1024² was 58.0 GiB (benchmarks/bench-h100-a.json)
    assert 58.0 <= need["resident"] <= 62.0


@pytest.mark.parametrize("budget", [6, 8, 10, 16, 24])
def test_stream_keeps_as_many_blocks_as_fit(budget):
    blocks = resident_blocks(FULL, budget)
    resident = sum(FULL.blocks_fp8[:blocks])
    assert resident + PLANS["stream"].need_gib(FULL) <= usable(budget)
    if blocks < 60:  # one more block would not fit
        assert resident + FULL.blocks_fp8[0] + PLANS["stream"].need_gib(FULL) > usable(budget)


def test_more_budget_more_resident_blocks():
    counts = [resident_blocks(FULL, b) for b in (6, 8, 10, 16, 24, 40)]
    assert counts == sorted(counts) and counts[-1] == 60


def test_named_plan_checks_and_step_down():
    cpu = torch.device("cpu")
    assert choose_plan(None, cpu, "resident").name == "resident"
    assert choose_plan(None, cpu, "auto").name == "resident"
    with pytest.raises(InvalidRequestError, match="plan='nope'"):
        choose_plan(None, cpu, "nope")
    with pytest.raises(InvalidRequestError, match="needs a CUDA GPU"):
        choose_plan(None, cpu, "stream")
    assert next_plan("resident") == "resident-fp8"
    assert next_plan("stream") is None


def test_auto_on_a_small_budget_says_what_it_needs(monkeypatch):
    import qie.memory.plans as plans

    monkeypatch.setattr(plans, "measure_sizes", lambda pipe, **kw: FULL)
    cuda = torch.device("cuda")
    assert plans.choose_plan(None, cuda, "auto", budget_gib=80).name == "resident"
    assert plans.choose_plan(None, cuda, "auto", budget_gib=30).name == "fp8-te-stream"
    assert plans.choose_plan(None, cuda, "auto", budget_gib=10).name == "stream"
    with pytest.raises(ResourceError, match="GiB"):
        plans.choose_plan(None, cuda, "auto", budget_gib=3)


def test_onload_per_call_leaves_the_weights_on_the_host_between_calls():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    expected = layer(x)
    onload_per_call(layer, torch.device("cpu"))
    assert torch.equal(layer(x), expected) and torch.equal(layer(x), expected)
    assert layer.weight.device.type == "cpu"


def test_sizes_count_a_text_encoder_stored_in_fp8_at_one_byte():
    from qie.core.models import load_pipeline
    from qie.memory.quantize import store_text_encoder_fp8

    pipe = load_pipeline("tiny", device=torch.device("cpu"), dtype=torch.float32)
    before = measure_sizes(pipe)
    stored = store_text_encoder_fp8(pipe.text_encoder, torch.float32)
    after = measure_sizes(pipe)
    fp8_params = sum(p.numel() for p in pipe.text_encoder.parameters() if p.dtype == torch.float8_e4m3fn)
    assert stored > 0 and after.text_encoder == pytest.approx(before.text_encoder - fp8_params / 2**30)
    assert after.transformer == before.transformer and after.vae == before.vae
