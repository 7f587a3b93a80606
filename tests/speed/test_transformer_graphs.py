"""The transformer's CUDA-graph replays (`qie.speed.transformer_graphs`, `stages.GraphedPrediction`).

On the CPU a stand-in recorder plays the graph: it keeps the recorded function and, on replay, writes
what the function computes from the buffers into the output the recording returned, as a CUDA graph
does. On a GPU the real one runs (marked `gpu`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import pytest
import torch
from conftest import clone_editor, small_request

from qie.errors import InvalidRequestError
from qie.memory.plans import PLANS
from qie.speed.cuda_graphs import weight_addresses
from qie.speed.transformer_graphs import TransformerGraphs


class FakeGraph:
    def __init__(self, fn, out):
        self.fn, self.out, self.replays = fn, out, 0

    def replay(self):
        self.replays += 1
        self.out.copy_(self.fn())

    def pool(self):
        return "pool"


def fake_record(fn, pool, error_mode="global"):
    out = fn()
    return FakeGraph(fn, out), out


def graphs_for(module=None, **kw) -> TransformerGraphs:
    return TransformerGraphs(module or torch.nn.Linear(2, 2), record=fake_record, weights=lambda m: (1,), **kw)


def counting(calls: list):
    def forward(x, t):
        calls.append(x)
        return x * 2 + t

    return forward


def test_a_shape_is_recorded_when_a_later_edit_calls_it_again_and_the_replays_read_new_inputs():
    graphs, calls = graphs_for(), []
    forward = counting(calls)
    x, t = torch.ones(1, 3), torch.zeros(1)
    first = graphs.start_edit()
    assert torch.equal(graphs(first, forward, "v", x=x, t=t), x * 2)
    assert torch.equal(graphs(first, forward, "v", x=x + 1, t=t), (x + 1) * 2)  # same edit: still as it is
    assert graphs.recorded == 0 and calls[-1] is not None
    second = graphs.start_edit()
    got = graphs(second, forward, "v", x=x + 2, t=t + 1)  # recorded now, then replayed
    assert graphs.recorded == 1 and torch.equal(got, (x + 2) * 2 + 1)
    graph = next(iter(graphs.graphs.values()))
    assert calls[-1] is graph.inputs["x"]  # the recording read the buffers, not the caller's tensors
    again = graphs(second, forward, "v", x=x + 5, t=t)
    assert torch.equal(again, (x + 5) * 2) and graph.graph.replays == 2
    again.add_(100)  # the caller owns what it got: the next replay's buffer is another tensor
    assert torch.equal(graphs(graphs.start_edit(), forward, "v", x=x, t=t), x * 2) and graphs.recorded == 1


def test_another_variant_or_shape_is_a_graph_of_its_own():
    graphs, calls = graphs_for(), []
    forward = counting(calls)
    x, t = torch.ones(1, 3), torch.zeros(1)
    edit = graphs.start_edit()
    graphs(edit, forward, ("fast", "off"), x=x, t=t)
    later = graphs.start_edit()
    graphs(later, forward, ("fast", "off"), x=x, t=t)
    got = graphs(later, forward, ("fast", "fp8"), x=x, t=t)  # first seen in this edit: as it is
    assert torch.equal(got, x * 2) and graphs.recorded == 1
    graphs(later, forward, ("fast", "off"), x=torch.ones(1, 4), t=t)
    assert graphs.recorded == 1
    last = graphs.start_edit()
    graphs(last, forward, ("fast", "fp8"), x=x, t=t)
    assert torch.equal(graphs(last, forward, ("fast", "off"), x=torch.ones(1, 4), t=t), torch.ones(1, 4) * 2)
    assert graphs.recorded == 3


def test_the_least_recently_used_graph_goes_first():
    graphs = graphs_for(max_graphs=2)
    forward, t = counting([]), torch.zeros(1)
    a, b, c = (torch.ones(1, n) for n in (2, 3, 4))
    for x in (a, b, c):  # each shape met by an earlier edit
        graphs(graphs.start_edit(), forward, "v", x=x, t=t)
    edit = graphs.start_edit()
    for x in (a, b, a, c):  # records a and b; a is used again; c's recording drops b
        assert torch.equal(graphs(edit, forward, "v", x=x, t=t), x * 2)
    x_shapes = [dict((name, shape) for name, shape, *_ in key[1:])["x"] for key in graphs.graphs]
    assert graphs.recorded == 3 and x_shapes == [(1, 2), (1, 4)]


def test_only_the_most_recent_shapes_are_remembered_as_met(monkeypatch):
    from qie.speed import transformer_graphs

    monkeypatch.setattr(transformer_graphs, "MAX_SEEN", 2)
    graphs, forward, t = graphs_for(), counting([]), torch.zeros(1)
    shapes = [torch.ones(1, n) for n in (2, 3, 4)]
    edit = graphs.start_edit()
    for x in shapes:
        graphs(edit, forward, "v", x=x, t=t)
    assert len(graphs.seen) == 2
    later = graphs.start_edit()
    for x in reversed(shapes):
        graphs(later, forward, "v", x=x, t=t)
    assert graphs.recorded == 2 and len(graphs.graphs) == 2  # (1, 2) was forgotten: met again, it runs as it is
    last_key, last_edit = next(reversed(graphs.seen.items()))
    assert last_edit == later and ("x", (1, 2), torch.float32, t.device) in last_key


def test_moved_weights_drop_the_graphs_and_weights_off_the_gpu_turn_them_off():
    weights = [(1, 2)]
    graphs = TransformerGraphs(torch.nn.Linear(2, 2), record=fake_record, weights=lambda m: weights[0])
    forward, x, t = counting([]), torch.ones(1, 3), torch.zeros(1)
    for _ in range(2):
        graphs(graphs.start_edit(), forward, "v", x=x, t=t)
    assert len(graphs.graphs) == 1
    weights[0] = (1, 3)
    edit = graphs.start_edit()
    assert edit is not None and not graphs.graphs and not graphs.seen
    weights[0] = "transformer_blocks.0.attn.to_q.weight on cpu"
    assert graphs.start_edit() is None and graphs.skipped == "transformer_blocks.0.attn.to_q.weight on cpu"


def test_weight_addresses_name_what_stops_a_graph_and_look_inside_tensor_subclasses():
    from diffusers.hooks import HookRegistry, ModelHook
    from torch.testing._internal.two_tensor import TwoTensor

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    plain = weight_addresses(model, "cpu")
    assert plain == tuple(p.data_ptr() for p in model.parameters())
    assert weight_addresses(model) == "0.weight on cpu"
    assert weight_addresses(model[0]) == "weight on cpu"  # a weight of the model itself: its own name
    registry = HookRegistry.check_if_exists_or_initialize(model[1])  # as diffusers' cache_context leaves it
    assert weight_addresses(model, "cpu") == plain
    registry.register_hook(ModelHook(), "probe")
    assert weight_addresses(model, "cpu") == "1: diffusers hooks probe"
    registry.remove_hook("probe")
    a, b = torch.zeros(2, 2), torch.ones(2, 2)
    model[0].weight = torch.nn.Parameter(TwoTensor(a, b), requires_grad=False)
    assert weight_addresses(model, "cpu")[:2] == (a.data_ptr(), b.data_ptr())
    model[1]._hf_hook = object()  # how accelerate marks a module it may move
    assert weight_addresses(model, "cpu") == "1: accelerate hook"


def test_weight_addresses_walk_the_modules_in_order_once_each_like_named_parameters():
    shared = torch.nn.Linear(2, 2)
    model = torch.nn.Sequential(
        torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3)), shared, torch.nn.Linear(2, 2, bias=False)
    )
    model.append(shared)  # the same module twice: its weights count once, as in `named_parameters`
    model[2].register_parameter("bias", None)
    assert weight_addresses(model, "cpu") == tuple(p.data_ptr() for p in model.parameters())
    model[0][1].bias = torch.nn.Parameter(torch.zeros(3, device="meta"))
    assert weight_addresses(model, "cpu") == "0.1.bias on meta"


def test_2511s_zero_cond_t_forward_is_not_replayed(tiny_2511_editor):
    graphs = TransformerGraphs(tiny_2511_editor.pipe.transformer, record=fake_record, weights=lambda m: (1,))
    assert graphs.start_edit() is None


def test_a_recording_that_fails_turns_the_graphs_off_once_and_the_calls_still_answer(caplog):
    def fail(fn, pool, error_mode="global"):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs = TransformerGraphs(torch.nn.Linear(2, 2), record=fail, weights=lambda m: (1,))
    forward, x, t = counting([]), torch.ones(1, 3), torch.zeros(1)
    graphs(graphs.start_edit(), forward, "v", x=x, t=t)
    with caplog.at_level(logging.WARNING, logger="qie.speed.transformer_graphs"):
        got = graphs(graphs.start_edit(), forward, "v", x=x, t=t)
        assert graphs.start_edit() is None
    assert torch.equal(got, x * 2) and graphs.disabled
    assert [r.message for r in caplog.records] == [
        "transformer: CUDA graphs off (RuntimeError: operation not permitted when stream is capturing); "
        "running as it is"
    ]


# --- in the editor --------------------------------------------------------------------------------
@pytest.fixture()
def graphed(tiny_editor):
    editor = clone_editor(tiny_editor, speed=tiny_editor.speed)
    weights = functools.partial(weight_addresses, device_type="cpu")  # the editor's own check, on the CPU
    editor.graphs = TransformerGraphs(editor.pipe.transformer, record=fake_record, weights=weights)
    return editor


def test_edits_that_repeat_their_shapes_replay_and_give_the_same_image(tiny_editor, graphed, photo):
    request = small_request(photo, true_cfg_scale=1.0, steps=3)
    want = tiny_editor.edit(request).image
    results = [graphed.edit(request) for _ in range(3)]
    graph = next(iter(graphed.graphs.graphs.values()))
    assert graphed.graphs.recorded == 1 and graph.graph.replays == 6  # the second edit's 3 steps and the third's
    for result in results:
        assert result.image.tobytes() == want.tobytes()
    notes = [[n for n in r.notes if "CUDA graphs" in n] for r in results]
    assert notes == [
        ["transformer CUDA graphs: 3 calls as they are (new shapes; the next edit with them replays)"],
        ["transformer CUDA graphs: 3 of 3 calls replayed (recorded in this edit)"],
        ["transformer CUDA graphs: 3 of 3 calls replayed"],
    ]
    other = dataclasses.replace(request, prompt="make it blue", seed=5)
    assert graphed.edit(other).image.tobytes() == tiny_editor.edit(other).image.tobytes()


def test_cfg_edits_and_step_caches_do_not_use_the_graphs(graphed, photo):
    for request in (
        small_request(photo, true_cfg_scale=4.0, negative_prompt="blurry", steps=2),
        small_request(photo, true_cfg_scale=1.0, steps=2, step_cache="fbcache"),
    ):
        for _ in range(2):
            graphed.edit(request)
    assert graphed.graphs.recorded == 0 and not graphed.graphs.seen
    assert not [n for n in graphed.edit(request).notes if "CUDA graphs" in n]


def test_enable_graphs_follows_the_device_the_plan_and_the_compile(tiny_editor):
    editor = clone_editor(tiny_editor)
    assert not editor.enable_graphs("on")  # on the CPU
    editor.device = torch.device("cuda")
    assert editor.enable_graphs("on") and not editor.enable_graphs("auto")  # not compiled
    editor.compiled, editor.compile_stats = True, {"mode": "default"}
    assert editor.enable_graphs("auto") and not editor.enable_graphs("off")
    editor.compile_stats = {"mode": "reduce-overhead"}  # CUDA graphs of its own
    assert not editor.enable_graphs("auto")
    editor.plan = PLANS["stream"]
    assert not editor.enable_graphs("on") and editor.graphs is None


def test_a_step_down_decides_again(tiny_editor, monkeypatch):
    editor = clone_editor(tiny_editor)
    editor.device, editor.compiled, editor.compile_stats = torch.device("cuda"), True, {"mode": "default"}
    assert editor.enable_graphs("auto")
    no_op = dataclasses.replace(PLANS["resident-fp8"], apply=lambda pipe, device, budget: None)
    monkeypatch.setitem(PLANS, "resident-fp8", no_op)
    monkeypatch.setattr("qie.speed.compile.uncompile_blocks", lambda transformer: None)
    assert editor.step_down() and editor.plan.name == "resident-fp8"
    assert editor.graphs is None and editor.graphs_setting == "auto"  # the compile was undone


def test_running_out_of_memory_while_recording_is_the_editors_to_handle():
    def oom(fn, pool, error_mode="global"):
        raise torch.OutOfMemoryError("CUDA out of memory")

    graphs = TransformerGraphs(torch.nn.Linear(2, 2), record=oom, weights=lambda m: (1,))
    forward, x, t = counting([]), torch.ones(1, 3), torch.zeros(1)
    graphs(graphs.start_edit(), forward, "v", x=x, t=t)
    with pytest.raises(torch.OutOfMemoryError):
        graphs(graphs.start_edit(), forward, "v", x=x, t=t)
    assert not graphs.disabled


def test_load_options_name_a_bad_transformer_graphs_value():
    from qie.core.load_options import LoadOptions

    with pytest.raises(InvalidRequestError) as err:
        LoadOptions(model="tiny", transformer_graphs="yes")
    assert err.value.param == "transformer_graphs" and "auto, on, off" in str(err.value)


# --- on a GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_replayed_edits_equal_the_edit_as_it_is(photo):
    from qie import Editor

    editor = Editor.load("tiny", device="cuda", transformer_graphs="on")
    assert editor.graphs is not None
    request = small_request(photo, true_cfg_scale=1.0, steps=3)
    editor.graphs, graphs = None, editor.graphs
    want = editor.edit(request).image
    editor.graphs = graphs
    images = [editor.edit(request).image for _ in range(3)]
    assert graphs.recorded == 1 and not graphs.disabled
    for image in images:
        assert image.tobytes() == want.tobytes()
