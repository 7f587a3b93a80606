"""The two encoders at once on two CUDA streams: the same encodings, the order of GPU work kept."""

import pytest
import torch
from conftest import clone_editor, small_request

from qie import Editor
from qie.core import stages
from qie.speed import side_stream


def test_tensors_in_finds_the_tensors_of_nested_results():
    condition = stages.Condition(latents=torch.zeros(1, 4, 8), shapes=[(1, 2, 2)])
    found = list(side_stream.tensors_in(((condition, True), [torch.ones(2)], None)))
    assert [t.shape for t in found] == [torch.Size([1, 4, 8]), torch.Size([2])]


def test_an_edit_with_overlapped_encoders_equals_the_sequential_one(tiny_editor, photo, monkeypatch):
    request = small_request(photo, seed=3, steps=2)
    sequential = clone_editor(tiny_editor)
    assert not sequential.overlaps_encoders  # CPU: one stream
    want = sequential.edit(request)
    assert "text_encode" in want.timings and "condition_encode" in want.timings
    overlapped = clone_editor(tiny_editor)
    monkeypatch.setattr(Editor, "overlaps_encoders", property(lambda self: True))
    calls = []
    real = side_stream.side_by_side

    def spy(device, main, side):
        calls.append(device)
        return real(device, main, side)

    monkeypatch.setattr("qie.core.editor.side_by_side", spy)
    got = overlapped.edit(request)
    assert calls == [tiny_editor.device]
    assert "encode" in got.timings and "text_encode" not in got.timings
    assert list(got.image.getdata()) == list(want.image.getdata())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_side_work_sees_earlier_work_and_later_work_sees_it():
    device = torch.device("cuda")
    for _ in range(3):
        x = torch.zeros(4096, 4096, device=device)
        x += 1  # earlier work on the current stream
        big = torch.randn(4096, 4096, device=device)
        first, second = side_stream.side_by_side(device, lambda b=big: (b @ b).sum(), lambda x=x: x * 2)
        total = second.sum()  # later work on the current stream reads the side stream's result
        assert total.item() == 2 * 4096 * 4096
        assert torch.isfinite(first)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_resident_plan_overlaps_and_the_edit_is_unchanged(photo):
    editor = Editor.load("tiny", device="cuda")
    assert editor.overlaps_encoders
    request = small_request(photo, seed=5, steps=2)
    got = editor.edit(request)
    editor.overlap_encoders = False
    editor.cache.clear()
    want = editor.edit(request)
    assert "encode" in got.timings and "text_encode" in want.timings
    assert list(got.image.getdata()) == list(want.image.getdata())
