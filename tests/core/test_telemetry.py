"""Per-request JSON logs (no prompts by default), recent stats, health, secret redaction."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import small_request
from PIL import Image

from qie import BusyError, telemetry


def request_lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "qie.requests"]


def test_one_json_line_per_request_without_the_prompt(tiny_editor, photo, caplog, monkeypatch):
    monkeypatch.delenv("QIE_LOG_PROMPTS", raising=False)
    prompt = "make the private label say 4711"
    with caplog.at_level(logging.INFO, logger="qie.requests"):
        result = tiny_editor.edit(small_request(photo, prompt=prompt, steps=2))
    (line,) = request_lines(caplog)
    assert line["request_id"] == result.request_id and len(result.request_id) == 12
    assert line["outcome"] == "ok" and line["plan"] == "resident" and line["steps_run"] == 2
    assert set(line["timings"]) == {"text_encode", "condition_encode", "denoise", "decode"}
    assert line["peak_vram_gib"] is None and line["size"] == "128x96" and line["seconds"] > 0
    assert line["prompt_chars"] == len(prompt) and len(line["prompt_sha256"]) == 16
    assert "4711" not in caplog.text and "prompt" not in line


def test_full_prompt_only_with_debug_flag(tiny_editor, photo, caplog, monkeypatch):
    monkeypatch.setenv("QIE_LOG_PROMPTS", "1")
    with caplog.at_level(logging.INFO, logger="qie.requests"):
        tiny_editor.edit(small_request(photo, prompt="white background", steps=2))
    assert request_lines(caplog)[-1]["prompt"] == "white background"


def test_failures_are_logged_with_their_outcome(tiny_editor, photo, caplog):
    with caplog.at_level(logging.INFO, logger="qie.requests"):
        with tiny_editor.lock, pytest.raises(BusyError):
            tiny_editor.edit(small_request(photo), timeout=0.01)
        with pytest.raises(Exception, match="tokens"):
            tiny_editor.edit(small_request(photo, prompt="把背景换成白色" * 60, steps=2))
    busy, invalid = request_lines(caplog)[-2:]
    assert (busy["outcome"], busy["error"]) == ("busy", "BusyError")
    assert (invalid["outcome"], invalid["param"]) == ("invalid", "prompt")
    assert "背景" not in caplog.text  # the value (part of the prompt) is not logged
    stats = telemetry.RECENT.stats()
    assert stats["requests"]["busy"] >= 1 and stats["requests"]["ok"] >= 1 and stats["p50_s"] > 0


def test_health(tiny_editor):
    assert telemetry.health(None)["status"] == "loading"
    status = telemetry.health(tiny_editor)
    assert status["status"] == "ready" and status["model"] == "tiny" and status["busy"] is False
    assert status["rss_gib"] > 0 and "p95_s" in status
    json.dumps(status)


def test_secrets_are_redacted(monkeypatch, caplog):
    monkeypatch.setenv("MY_API_TOKEN", "s3cr3t-value-123")
    logger = logging.getLogger("qie.test-redaction")
    with caplog.at_level(logging.INFO):
        caplog.handler.addFilter(telemetry.RedactSecrets())
        logger.info("token %s and hf_%s", "s3cr3t-value-123", "a" * 34)
    assert "s3cr3t" not in caplog.text and "aaaa" not in caplog.text
    assert "token *** and hf_***" in caplog.text


def test_secrets_are_masked_in_tracebacks_and_later_handlers(monkeypatch, capsys):
    import io
    import sys

    from qie import EditRequest
    from qie.errors import InvalidRequestError

    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-9f8e7d6c5b4a")
    monkeypatch.setattr(logging, "_logRecordFactory", logging.getLogRecordFactory())  # restored afterwards
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    telemetry.install_redaction(logging.getLogger("qie.test-none"))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # added after install_redaction, as Ray's handlers are
    logger = logging.getLogger("qie.test-traceback")
    logger.addHandler(handler)
    try:
        hf = "hf_" + "Q" * 34
        try:
            EditRequest(images=[Image.new("RGB", (64, 64))], prompt="x", tile_size=hf)
        except InvalidRequestError:
            logger.exception("edit failed with redis://:pa55word-xyz@cache:6379/0")
        try:
            raise RuntimeError("token tok-9f8e7d6c5b4a rejected")
        except RuntimeError:
            logger.error("failed", exc_info=True)
            sys.excepthook(*sys.exc_info())
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue() + capsys.readouterr().err
    assert "Traceback" in text and "tile_size='hf_***'" in text
    for secret in ("Q" * 20, "pa55word", "tok-9f8e7d6c5b4a"):
        assert secret not in text, text
    assert text.count("***") >= 4


class FakeGpu:
    """A CUDA stand-in for `StageTimer`: a GPU clock the test moves, events stamped from it."""

    def __init__(self):
        self.now = 0.0  # seconds on the GPU's timeline (its origin is the host's 0)
        self.streams = []  # where each event was recorded

    def event(self, enable_timing=True):
        gpu = self

        class Event:
            def record(self, stream=None):
                self.t = gpu.now
                gpu.streams.append(stream)

            def elapsed_time(self, other):
                return (other.t - self.t) * 1e3

        return Event()


def test_on_cuda_a_stage_lasts_until_host_and_gpu_are_both_done(monkeypatch):
    """The host launches the VAE encode (5 ms) and moves on; the GPU runs it until 30 ms; the host
    prepares and runs the text encoder until 60 ms, the GPU finishing it at 62 ms. Without waiting
    between stages: condition 30 ms, text 32 ms, in all the 62 ms the two took."""
    import torch

    gpu, host = FakeGpu(), {"now": 0.0}
    monkeypatch.setattr(torch.cuda, "Event", gpu.event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    waits = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waits.append(device))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2**30)
    monkeypatch.setattr(telemetry.time, "perf_counter", lambda: host["now"])
    timer = telemetry.StageTimer(torch.device("cuda", 1))
    with timer("condition_encode"):
        host["now"] = 0.005
        gpu.now = 0.030  # events queued from here on run once the encode is done
    with timer("text_encode"):
        host["now"] = 0.060
        gpu.now = 0.062
    timings = timer.timings
    assert timings == pytest.approx({"condition_encode": 0.030, "text_encode": 0.032})
    assert len(waits) == 2  # at the start (the clocks' common origin) and to read the timings, not between stages
    assert timer.peaks_gib == {"condition_encode": 1.0, "text_encode": 1.0}
    assert set(gpu.streams) == {"stream of cuda:1"}  # the timer's device, not the current one


def test_stages_entered_twice_add_up_on_the_host_clock():
    import torch

    timer = telemetry.StageTimer(torch.device("cpu"))
    for _ in range(2):
        with timer("decode"):
            pass
    with timer("denoise"):
        pass
    assert list(timer.timings) == ["decode", "denoise"] and timer.peak_vram_gib() is None
