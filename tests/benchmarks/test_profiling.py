"""benchmarks.profiling on CPU: the captured call is replayed and timed; a module never called is an error."""

import pytest
import torch

from benchmarks.profiling import capture_call, profile_forward


def test_profile_replays_the_first_call_and_times_it():
    layer = torch.nn.Linear(16, 16)
    calls = []
    layer.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape))
    summary = profile_forward(layer, lambda: (layer(torch.randn(3, 16)), layer(torch.randn(5, 16))), repeats=2)
    assert summary["forward_s"] > 0 and summary["h2d_s"] == 0.0
    assert calls[2:] == [torch.Size([3, 16])] * (1 + 2 + 2)  # warm-up, timed, profiled: the first call's input


def test_capture_names_a_module_that_was_not_called():
    with pytest.raises(RuntimeError, match="Linear was not called"):
        capture_call(torch.nn.Linear(2, 2), lambda: None)
