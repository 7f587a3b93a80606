"""Mixing a class into some of a model's modules, and taking it out: same modules, another forward."""

import torch

from qie.speed.mixins import mix_in, mix_out


class Doubled(torch.nn.Module):
    def forward(self, x):
        return super().forward(x) * 2


def doubled(base: type) -> type:
    return type(f"Doubled{base.__name__}", (Doubled, base), {})


def test_only_eligible_modules_change_and_taking_the_mixin_out_restores_them():
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.ReLU(), torch.nn.Identity())
    x = torch.tensor([-1.0, 3.0])
    assert mix_in(model, lambda m: isinstance(m, torch.nn.Identity), doubled) == 2
    assert [type(m).__name__ for m in model] == ["DoubledIdentity", "ReLU", "DoubledIdentity"]
    assert model(x).tolist() == [0.0, 12.0]
    mix_out(model, Doubled)
    assert [type(m) for m in model] == [torch.nn.Identity, torch.nn.ReLU, torch.nn.Identity]
    assert model(x).tolist() == [0.0, 3.0]


def test_a_forward_left_by_removed_hooks_is_dropped_both_ways_and_a_live_one_skips_the_module():
    stale, live = torch.nn.Identity(), torch.nn.Identity()
    stale.forward = stale.forward  # what diffusers' hook registry leaves when its hooks are removed
    live.forward = lambda x: x + 1  # a live wrapper: the class swap would never run
    model = torch.nn.Sequential(stale, live)
    x = torch.tensor([1.0])
    assert mix_in(model, lambda m: isinstance(m, torch.nn.Identity), doubled) == 1
    assert "forward" not in vars(stale) and isinstance(stale, Doubled) and not isinstance(live, Doubled)
    assert model(x).tolist() == [3.0]  # doubled, then the live wrapper
    stale.forward = stale.forward  # hooks added and removed while the mixin is in: bound to its forward
    mix_out(model, Doubled)
    assert "forward" not in vars(stale) and type(stale) is torch.nn.Identity
    assert model(x).tolist() == [2.0]
