"""Stage timings and peak GPU memory for one edit; per-request JSON logs, recent stats, health.

Request logs never hold a full prompt unless `QIE_LOG_PROMPTS=1`: a prompt appears as a hash and
a length. `install_redaction` masks tokens and secrets in every log line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from qie.settings import read as read_setting

STAGE_RANGE = "qie."  # the prefix of the profiler range each timed stage opens
STEP_RANGE = "qie:"  # the prefix of the ranges around the host's steps inside a stage (`step_range`)


def step_range(name: str) -> torch.profiler.record_function:
    """A profiler range named `qie:<name>` around one host step of a stage (the processor, the weight
    check): a trace then says what the host did while the GPU waited. A few microseconds unprofiled.

    Example:
        >>> with step_range("processor"):
        ...     pass
    """
    return torch.profiler.record_function(f"{STEP_RANGE}{name}")


class StageTimer:
    """Times named stages; on CUDA each stage lasts until both the host and the GPU are done with it.

    Off CUDA a stage's time is the host's. On CUDA the timer does not wait for the GPU between
    stages (a wait would drain its queue, and work the host does next, such as the text encoder's
    image preparation while the VAE encodes, could no longer overlap it): each boundary is marked
    by a CUDA event and a host clock reading, and lies at the later of the two
    (`stage_boundary`); a stage lasts from its start boundary to its end boundary. Reading
    `timings` waits for the GPU. Peak memory is the allocator's, per stage. Under `torch.profiler`
    each stage is a range named `qie.<stage>` (`STAGE_RANGE`).

    Example:
        >>> timer = StageTimer(torch.device("cpu"))
        >>> with timer("decode"):
        ...     pass
        >>> list(timer.timings)
        ['decode']
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peaks_gib: dict[str, float] = {}  # per-stage peak allocated GPU memory (CUDA only)
        self._overall = 0.0
        self._gpu = device.type == "cuda"
        self._spans: list[tuple[str, tuple[float, Any], tuple[float, Any]]] = []  # stage, start and end marks
        self._origin: tuple[float, Any] = (time.perf_counter(), None)
        if self._gpu:
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.synchronize(device)  # the GPU clock's origin: one wait, at the start
            self._origin = self._mark()

    def _mark(self) -> tuple[float, Any]:
        """(host clock, CUDA event recorded now on the timer's device's current stream, or None off CUDA)."""
        event = None
        if self._gpu:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
        return time.perf_counter(), event

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = self._mark()
        try:
            with torch.profiler.record_function(f"{STAGE_RANGE}{stage}"):  # a range in a profiler's trace
                yield
        finally:
            self._spans.append((stage, start, self._mark()))
            if self._gpu:
                peak = torch.cuda.max_memory_allocated(self.device) / 2**30
                self.peaks_gib[stage] = max(peak, self.peaks_gib.get(stage, 0.0))
                self._overall = max(self._overall, peak)
                torch.cuda.reset_peak_memory_stats(self.device)

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per stage (a stage entered twice adds up); on CUDA, waits for the GPU's queued work."""
        if self._gpu and self._spans:
            torch.cuda.synchronize(self.device)  # every event done, on whichever stream it was recorded
        out: dict[str, float] = {}
        for stage, start, end in self._spans:
            out[stage] = out.get(stage, 0.0) + self._at(end) - self._at(start)
        return out

    def _at(self, mark: tuple[float, Any]) -> float:
        host, event = mark
        if event is None:
            return host
        origin_host, origin_event = self._origin
        return stage_boundary(host, origin_host + origin_event.elapsed_time(event) / 1e3)

    def peak_vram_gib(self) -> float | None:
        """Peak memory allocated by torch on the GPU since the timer started (None on CPU)."""
        if not self._gpu:
            return None
        return max(self._overall, torch.cuda.max_memory_allocated(self.device) / 2**30)


def stage_boundary(host_s: float, gpu_s: float) -> float:
    """When a stage boundary is passed: once the host has reached it and the GPU has run all work queued
    before it (both on the host's clock; the GPU's time is its event's, from a common origin).

    Example:
        >>> stage_boundary(0.010, 0.035)  # the host moved on at 10 ms, the GPU finished at 35 ms
        0.035
    """
    return max(host_s, gpu_s)


# --- per-request records: one JSON log line each, a window of recent ones, health -------------

REQUEST_LOG = logging.getLogger("qie.requests")
SECRET_ENV_WORDS = ("TOKEN", "SECRET", "PASSWORD", "API_KEY", "ACCESS_KEY")
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")


def prompt_fields(prompt: str | None, key: str = "prompt") -> dict[str, Any]:
    """What the logs say about a prompt: a short hash and its length; the text only with `QIE_LOG_PROMPTS=1`.

    Example:
        >>> sorted(prompt_fields("white background"))
        ['prompt_chars', 'prompt_sha256']
    """
    if prompt is None:
        return {}
    fields: dict[str, Any] = {
        f"{key}_sha256": hashlib.sha256(prompt.encode()).hexdigest()[:16],
        f"{key}_chars": len(prompt),
    }
    if read_setting("log_prompts"):
        fields[key] = prompt
    return fields


class RecentRequests:
    """The last `size` request records, thread-safe, for the metrics view and `/health`."""

    def __init__(self, size: int = 200) -> None:
        self._records: deque[dict[str, Any]] = deque(maxlen=size)
        self._lock = threading.Lock()
        self.total: Counter[str] = Counter()

    def add(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._records.append(record)
            self.total[record["outcome"]] += 1

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._records)

    def stats(self) -> dict[str, Any]:
        """Counts by outcome since start, and latency / peak VRAM over the recent window."""
        records = self.records()
        done = sorted(r["seconds"] for r in records if r["outcome"] == "ok")
        vram = [r["peak_vram_gib"] for r in records if r.get("peak_vram_gib") is not None]
        with self._lock:
            total = dict(self.total)
        return {
            "requests": total,
            "window": len(records),
            "p50_s": _quantile(done, 0.5),
            "p95_s": _quantile(done, 0.95),
            "last_peak_vram_gib": vram[-1] if vram else None,
            "max_peak_vram_gib": max(vram) if vram else None,
        }


RECENT = RecentRequests()


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


class RequestRecord:
    """Collects one request's facts; `finish` logs them as one JSON line and keeps them in `RECENT`.

    Example:
        >>> record = RequestRecord({"steps": 2})
        >>> record.finish("ok")["outcome"]
        'ok'
    """

    def __init__(self, fields: dict[str, Any]) -> None:
        self.request_id = uuid.uuid4().hex[:12]
        self.fields = fields
        self._start = time.perf_counter()

    def finish(self, outcome: str, **fields: Any) -> dict[str, Any]:
        record = {
            "event": "edit",
            "request_id": self.request_id,
            "time": round(time.time(), 3),
            "outcome": outcome,
            "seconds": round(time.perf_counter() - self._start, 4),
            **self.fields,
            **fields,
        }
        REQUEST_LOG.info(json.dumps(record, default=str, ensure_ascii=False))
        RECENT.add(record)
        return record


def error_fields(exc: BaseException) -> dict[str, Any]:
    """How an error appears in the request log: its type, and for bad parameters the name and fix
    (not the value, which may be part of a prompt)."""
    fields: dict[str, Any] = {"error": type(exc).__name__}
    if hasattr(exc, "param") and hasattr(exc, "fix"):
        fields.update(param=exc.param, fix=exc.fix)
    else:
        fields["message"] = str(exc).splitlines()[0][:300] if str(exc) else ""
    return fields


def memory_status(device: torch.device | None = None) -> dict[str, Any]:
    """Host RSS and, on CUDA, allocated / free / total GPU memory, in GiB."""
    import psutil

    status: dict[str, Any] = {"rss_gib": round(psutil.Process().memory_info().rss / 2**30, 3)}
    if device is not None and device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        status.update(
            vram_allocated_gib=round(torch.cuda.memory_allocated(device) / 2**30, 3),
            vram_free_gib=round(free / 2**30, 3),
            vram_total_gib=round(total / 2**30, 3),
        )
    return status


def health(editor: Any | None) -> dict[str, Any]:
    """Readiness: "ready" once a model is loaded, with what it runs and recent request stats.

    Example:
        >>> health(None)["status"]
        'loading'
    """
    if editor is None:
        return {"status": "loading", **RECENT.stats()}
    return {
        "status": "ready",
        "model": editor.model,
        "plan": editor.plan.name,
        "device": str(editor.device),
        "busy": editor.lock.locked(),
        **memory_status(editor.device),
        **RECENT.stats(),
    }


def metrics_view(editor: Any | None, limit: int = 10) -> dict[str, Any]:
    """What the app's metrics panel shows: latency / VRAM stats, memory now, the last `limit` requests."""
    keys = ("request_id", "outcome", "seconds", "peak_vram_gib", "size", "steps", "plan")
    return {
        **RECENT.stats(),
        **memory_status(editor.device if editor is not None else None),
        "recent": [{k: r.get(k) for k in keys} for r in RECENT.records()[-limit:][::-1]],
    }


_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s/@:]*:)[^\s/@]+@", re.IGNORECASE)
_BEARER = re.compile(r"(\bBearer\s+)[A-Za-z0-9._~+/=-]{8,}")
_EXTRA_SECRETS: set[str] = set()  # values registered by `add_secret` (e.g. a generated cache key)


def add_secret(value: str | None) -> None:
    """Mask `value` in every log line from now on (for secrets that are not in the environment)."""
    if value and len(value) >= 8:
        _EXTRA_SECRETS.add(value)


def redact(text: str) -> str:
    """`text` with Hugging Face tokens, URL passwords, bearer tokens and secret values masked.

    Secret values are those of environment variables whose names contain TOKEN, SECRET,
    PASSWORD, API_KEY or ACCESS_KEY, and those given to `add_secret`.

    Example:
        >>> redact("redis://:hunter2hunter2@cache:6379/0 Bearer abcdefgh1234")
        'redis://:***@cache:6379/0 Bearer ***'
    """
    cleaned = _HF_TOKEN.sub("hf_***", text)
    cleaned = _URL_PASSWORD.sub(r"\1***@", cleaned)
    cleaned = _BEARER.sub(r"\1***", cleaned)
    for secret in sorted(_secret_values(), key=len, reverse=True):
        cleaned = cleaned.replace(secret, "***")
    return cleaned


def _secret_values() -> set[str]:
    from_env = {
        value
        for key, value in os.environ.items()
        if len(value) >= 8 and any(word in key.upper() for word in SECRET_ENV_WORDS)
    }
    return from_env | _EXTRA_SECRETS


class RedactSecrets(logging.Filter):
    """Masks secrets (see `redact`) in log records: the message, the traceback and the stack."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Mask secrets in `record` in place: its message, its formatted traceback and stack."""
    if getattr(record, "_qie_redacted", False):
        return record
    try:
        message = record.getMessage()
    except Exception:  # a malformed call; logging reports it when the record is formatted
        return record
    cleaned = redact(message)
    if cleaned != message:
        record.msg, record.args = cleaned, None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    record._qie_redacted = True
    return record


def install_redaction(logger: logging.Logger | None = None) -> None:
    """Mask secrets in every log record from now on, and in uncaught tracebacks.

    Records are cleaned when they are created (so handlers added later, e.g. Ray's, are covered
    too); `RedactSecrets` is also added to the handlers of `logger` (default: the root logger).
    """
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "_qie_redacting", False):

        def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            return redact_record(factory(*args, **kwargs))

        redacting_factory._qie_redacting = True  # type: ignore[attr-defined]
        logging.setLogRecordFactory(redacting_factory)
    if not getattr(sys.excepthook, "_qie_redacting", False):
        sys.excepthook = _redacting_excepthook
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())


def _redacting_excepthook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    import traceback

    sys.stderr.write(redact("".join(traceback.format_exception(kind, exc, tb))))


_redacting_excepthook._qie_redacting = True  # type: ignore[attr-defined]
