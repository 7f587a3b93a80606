"""The app's edits as cancellable jobs, tied to Gradio's own cancellation and to client disconnects.

Gradio's cancel (`job.cancel()` in gradio_client, the Cancel button) and a client that goes away do
not stop Python work by themselves. `run_cancellable` runs the edit in a worker thread and sets the
job's cancel event when Gradio cancels the task or marks the event dead, so the editor stops at its
next denoising step and Gradio's queue slot is free at once. `SessionJobs` also remembers when a
session asked to cancel, so an edit of that session still waiting in the queue is dropped when it
comes up.

Example:
    >>> jobs = SessionJobs()
    >>> with jobs.job("tab-1") as job:
    ...     job.on_step(3, 40)
    ...     jobs.cancel("tab-1") is job, job.is_set()
    (True, True)
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")
POLL_S = 0.2  # how often a running edit checks that its client is still there
MAX_SESSIONS = 1024  # sessions remembered for "Cancelled after N of M steps" and dropped waiting edits


class Job(threading.Event):
    """The cancel event of one running edit, with how far it got."""

    def __init__(self) -> None:
        super().__init__()
        self.step = 0
        self.total = 0
        self.finished = threading.Event()  # set when the worker thread is done, whatever the outcome
        self.ended: float | None = None  # `time.monotonic()` when it was done

    def on_step(self, step: int, total: int) -> None:
        self.step, self.total = step, total

    def progress_text(self, language: str = "en") -> str:
        from qie.app.i18n import say

        if not self.total:
            return say("cancelled_early", language)
        return say("cancelled_after", language, step=self.step, total=self.total)


class SessionJobs:
    """Maps a browser session to its running job; remembers each session's last cancel (thread-safe)."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._cancelled_at: dict[str, float] = {}
        self._last: dict[str, Job] = {}
        self._lock = threading.Lock()

    @contextmanager
    def job(self, key: str) -> Iterator[Job]:
        """Register a running job for `key` for the duration of the block."""
        job = Job()
        with self._lock:
            self._last.pop(key, None)  # re-inserted: newest last
            self._jobs[key] = self._last[key] = job
            _trim(self._last)
        try:
            yield job
        finally:
            with self._lock:
                if self._jobs.get(key) is job:
                    del self._jobs[key]

    def cancel(self, key: str) -> Job | None:
        """Stop the running job of `key` (None when none runs); edits of `key` queued before now are dropped."""
        with self._lock:
            self._cancelled_at.pop(key, None)
            self._cancelled_at[key] = time.monotonic()
            _trim(self._cancelled_at)
            job = self._jobs.get(key)
        if job is not None:
            job.set()
        return job

    def just_stopped(self, key: str, within_s: float = 5.0) -> Job | None:
        """The job of `key` that was cancelled (e.g. by Gradio's own cancel) and is stopping or has just stopped."""
        job = self.last(key)
        if job is None or not job.is_set():
            return None
        return job if job.ended is None or time.monotonic() - job.ended < within_s else None

    def last(self, key: str) -> Job | None:
        """The latest job of `key`, running or not."""
        with self._lock:
            return self._last.get(key)

    def cancelled_since(self, key: str, enqueued: float | None) -> bool:
        """Whether `key` asked to cancel after a job was enqueued at `enqueued` (`time.monotonic`)."""
        with self._lock:
            at = self._cancelled_at.get(key)
        return enqueued is not None and at is not None and at >= enqueued


def _trim(entries: dict) -> None:
    """Forget the oldest sessions past `MAX_SESSIONS` (dicts keep insertion order)."""
    while len(entries) > MAX_SESSIONS:
        del entries[next(iter(entries))]


def gradio_event() -> Any | None:
    """Gradio's queue entry of the event being processed (None outside an event)."""
    from gradio.context import LocalContext

    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    queue = getattr(blocks, "_queue", None)
    if queue is None or event_id is None:
        return None
    return queue.event_ids_to_events.get(event_id)


async def run_cancellable(work: Callable[[], T], job: Job, event: Any | None) -> T:
    """`work()` in a worker thread; sets `job` when the task is cancelled or the client goes away.

    A cancelled task returns at once (the thread stops at its next step), so it never holds the
    queue; `job.finished` is set when the thread is done.
    """

    def run() -> T:
        try:
            return work()
        finally:
            job.ended = time.monotonic()
            job.finished.set()

    future = asyncio.ensure_future(asyncio.to_thread(run))
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=POLL_S)
            if done:
                return future.result()
            if event is not None and not getattr(event, "alive", True):
                job.set()  # the client disconnected: Gradio dropped the event but not our thread
    except asyncio.CancelledError:
        job.set()
        future.add_done_callback(_retrieve)  # the thread's outcome is no one's now: do not log it as lost
        raise


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
