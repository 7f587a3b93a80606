"""The lever A/B script: its sections are the documented ones, and without a GPU it says so."""

import pytest

from benchmarks import fast_levers, levers_timing


def test_every_section_is_documented():
    for name in fast_levers.SECTIONS:
        assert f"  {name} " in fast_levers.__doc__


def test_without_a_gpu_it_refuses_by_name(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        fast_levers.main(["--sections", "kernels"])
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_an_unknown_section_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        fast_levers.main(["--sections", "rope,turbo"])
    assert "--sections turbo: unknown" in capsys.readouterr().err


def test_stopped_midway_it_writes_what_the_section_measured_and_ends(tmp_path, monkeypatch):
    import json
    import os
    import signal
    import time

    import torch

    ran = []

    def long_section(args, device):
        args.partial["variants"] = {"first": {"forward_ms": 1.5}}
        os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` does
        time.sleep(5)
        ran.append("long finished")
        return {}

    def never(args, device):
        ran.append("next section")
        return {}

    monkeypatch.setattr(fast_levers, "SECTIONS", {"long": long_section, "next": never})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "test GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    before = signal.getsignal(signal.SIGTERM)
    assert fast_levers.main(["--sections", "long,next", "--out", str(tmp_path), "--tag", "t"]) == 0
    assert ran == [] and signal.getsignal(signal.SIGTERM) is before
    sections = json.loads((tmp_path / "fast-levers-t.json").read_text())["sections"]
    assert sections["long"]["variants"] == {"first": {"forward_ms": 1.5}}
    assert sections["long"]["error"].startswith("Stopped") and "next" not in sections


@pytest.mark.parametrize("before", [None, "/somewhere/inductor"])
def test_empty_inductor_cache_gives_a_fresh_folder_and_puts_the_setting_back(monkeypatch, before):
    import os
    from pathlib import Path

    if before is None:
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", before)
    with pytest.raises(RuntimeError), levers_timing.empty_inductor_cache() as cache:
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == cache and not any(Path(cache).iterdir())
        raise RuntimeError("a section failed")
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before and not Path(cache).exists()
