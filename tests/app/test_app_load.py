"""Load: 50 app clients against the tiny model, some cancelling and some disconnecting mid-edit.

The app runs in-process with a small queue. A burst of clients arrives at once, the others at random
times (fixed seed); each waits for its edit (2 steps), cancels it (`job.cancel()` in gradio_client)
or disconnects (a browser-like client closes its event stream), while queued or after its edit
reached a random denoising step. Edits that will be cancelled ask for many steps, so a cancel that does not reach
the denoising loop shows as steps run after it.

Measured: served, refused (queue full), cancelled, disconnected, the wait from submit to the start
of the edit and to the result (p50/p95), and the compute spent on cancelled work: denoising steps
counted by the editor's step callback after the edit's cancel event was set (at most the step in
flight) and after the client's own cancel (that plus the time the server takes to notice). The
figures go to `$QIE_LOAD_REPORT` (JSON; a temporary file when unset) and one summary line.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from app_server import close, launch
from conftest import EXAMPLES

from qie.app import jobs

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.utils import QueueError  # noqa: E402

pytestmark = pytest.mark.slow

CLIENTS = 50
SEED = 17
QUEUE_SIZE = 8  # small, so that a burst is partly refused
BURST = 20  # clients that arrive together at the start: more than the queue holds, so some are refused
ARRIVALS_S = 10.0  # the others arrive at random times in this window
SHARES = {"serve": 0.5, "cancel": 0.25, "disconnect": 0.25}
SERVE = {"steps": 2, "max_side": 96, "condition_area": "output"}
CANCELLED_STEPS = 100  # edits that get cancelled: a cancel that does not stop them runs on for ~100 steps
ANSWER_S = 120.0  # generous: the machine is shared; counts are asserted, not timings
IMAGE = EXAMPLES / "cat.jpg"
SUBMITTING = ("STARTING", "JOINING_QUEUE")  # gradio_client statuses before the server holds the request


@dataclass
class Plan:
    """What one client does: when it arrives, and when (if ever) it cancels or disconnects."""

    index: int
    kind: str  # serve, cancel or disconnect
    arrive_s: float
    at_step: int | None = None  # cancel once the edit has run this many steps (None: while waiting)
    queued_delay_s: float = 0.0  # with at_step None: cancel this long after submitting

    @property
    def prompt(self) -> str:
        return f"load client {self.index}"

    def params(self) -> dict[str, Any]:
        steps = SERVE["steps"] if self.kind == "serve" else CANCELLED_STEPS
        return {**SERVE, "steps": steps, "prompt": self.prompt}


def make_plans(seed: int = SEED, clients: int = CLIENTS) -> list[Plan]:
    """The clients, drawn from `seed`: the same plans on every run."""
    rng = random.Random(seed)
    kinds = list(SHARES)
    plans = []
    for index in range(clients):
        kind = rng.choices(kinds, weights=[SHARES[k] for k in kinds])[0]
        plan = Plan(index, kind, arrive_s=rng.uniform(0, 0.05 if index < BURST else ARRIVALS_S))
        if kind != "serve":
            if rng.random() < 0.7:
                plan.at_step = rng.randint(1, 10)
            else:
                plan.queued_delay_s = rng.uniform(0, 0.3)
        plans.append(plan)
    return plans


@dataclass
class Trace:
    """One edit as the editor saw it: when it started, when each denoising step ended, how it ended."""

    prompt: str
    started: float
    steps: list[float] = field(default_factory=list)
    ended: float | None = None
    outcome: str | None = None
    job: Any = None  # the app's cancel event of this edit (`qie.app.jobs.Job`)
    reached: threading.Event = field(default_factory=threading.Event)


class StepLog:
    """The tiny editor, recording each edit's steps through its step callback (the app's `on_step`)."""

    def __init__(self, editor: Any) -> None:
        self._editor = editor
        self.traces: dict[str, Trace] = {}
        self._waiting: dict[str, tuple[int, threading.Event]] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._editor, name)

    def watch(self, prompt: str, step: int) -> threading.Event:
        """An event set once the edit of `prompt` has run `step` steps, or has ended."""
        event = threading.Event()
        with self._lock:
            self._waiting[prompt] = (step, event)
        return event

    def edit(self, request: Any, *, on_step: Any = None, cancel: Any = None, **kwargs: Any) -> Any:
        trace = Trace(request.prompt, time.monotonic(), job=getattr(cancel, "parent", None))
        with self._lock:
            self.traces[request.prompt] = trace
            step_wanted, event = self._waiting.get(request.prompt, (None, None))

        def counted(step: int, total: int) -> None:
            trace.steps.append(time.monotonic())
            if event is not None and step >= step_wanted:
                event.set()
            if on_step is not None:
                on_step(step, total)

        try:
            result = self._editor.edit(request, on_step=counted, cancel=cancel, **kwargs)
        except BaseException as exc:
            trace.outcome = type(exc).__name__
            raise
        else:
            trace.outcome = "ok"
            return result
        finally:
            trace.ended = time.monotonic()
            if event is not None:
                event.set()


@dataclass
class Outcome:
    """How one client's request ended, as the client saw it."""

    index: int
    kind: str
    answer: str  # served, refused, cancelled, disconnected, or "error: ..."
    submitted: float
    cancelled_at: float | None = None
    done: float | None = None


def _wait_for_trigger(plan: Plan, reached: threading.Event | None, done: Any, waiting: Any = None) -> None:
    """Block until the moment `plan` cancels: its edit `reached` its step, or `queued_delay_s` passed
    once the server holds the request (`waiting()`), or the request is `done()` first."""
    deadline = time.monotonic() + ANSWER_S
    if reached is None:
        while waiting is not None and not waiting() and not done() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(plan.queued_delay_s)
        return
    while not reached.wait(0.02) and not done() and time.monotonic() < deadline:
        pass


def _watch(plan: Plan, log: StepLog) -> threading.Event | None:
    """Registered before the request is sent, so that no step goes unseen."""
    return None if plan.at_step is None else log.watch(plan.prompt, plan.at_step)


def run_gradio_client(client: Client, plan: Plan, log: StepLog) -> Outcome:
    """A gradio_client caller of `/edit`; cancels with `job.cancel()` when its plan says so."""
    reached = _watch(plan, log) if plan.kind == "cancel" else None
    outcome = Outcome(plan.index, plan.kind, "", submitted=time.monotonic())
    job = client.submit(image=handle_file(str(IMAGE)), **plan.params(), api_name="/edit")
    if plan.kind == "cancel":
        # Cancelled while waiting: once the client knows its event (a `job.cancel()` while the
        # submission is still in flight has no event id to name, and the server never hears of it).
        _wait_for_trigger(plan, reached, job.done, lambda: job.status().code.name not in SUBMITTING)
        if not job.done():
            outcome.cancelled_at = time.monotonic()
            job.cancel()
    try:
        result = job.result(timeout=ANSWER_S)
        outcome.answer = "served" if result[2] else "error: empty result"
    except QueueError as exc:
        outcome.answer = "refused" if "full" in str(exc).lower() else f"error: {exc}"
    except Exception as exc:  # noqa: BLE001  (a cancelled job ends in gradio_client's own way)
        outcome.answer = "cancelled" if outcome.cancelled_at is not None else f"error: {exc!r}"
    outcome.done = time.monotonic()
    return outcome


class Tab:
    """A browser-like client of `/edit` over Gradio's queue protocol, which can close its event stream."""

    def __init__(self, url: str, fn_index: int, parameters: list[dict], image_path: str) -> None:
        self.url, self.fn_index, self.parameters, self.image_path = url, fn_index, parameters, image_path

    def payload(self, plan: Plan) -> list[Any]:
        image = {"path": self.image_path, "meta": {"_type": "gradio.FileData"}, "orig_name": IMAGE.name}
        values = {"image": image, **plan.params()}
        return [values.get(p["parameter_name"], p["parameter_default"]) for p in self.parameters]

    def run(self, plan: Plan, log: StepLog) -> Outcome:
        session = f"load-tab-{plan.index}"
        reached = _watch(plan, log)
        outcome = Outcome(plan.index, plan.kind, "", submitted=time.monotonic())
        body = {"data": self.payload(plan), "fn_index": self.fn_index, "session_hash": session, "trigger_id": None}
        joined = httpx.post(f"{self.url}gradio_api/queue/join", json=body, timeout=ANSWER_S)
        if joined.status_code == 503:
            outcome.answer, outcome.done = "refused", time.monotonic()
            return outcome
        joined.raise_for_status()
        params = {"session_hash": session}
        with httpx.stream("GET", f"{self.url}gradio_api/queue/data", params=params, timeout=ANSWER_S) as sse:
            trace_ended = lambda: (t := log.traces.get(plan.prompt)) is not None and t.ended is not None  # noqa: E731
            _wait_for_trigger(plan, reached, trace_ended)
            if not trace_ended():
                outcome.cancelled_at = time.monotonic()
                outcome.answer, outcome.done = "disconnected", time.monotonic()
                return outcome  # leaving the block closes the stream: the tab is gone
            outcome.answer = _read_answer(sse)
        outcome.done = time.monotonic()
        return outcome


def _read_answer(sse: httpx.Response) -> str:
    for line in sse.iter_lines():
        if line.startswith("data:"):
            message = json.loads(line[5:])
            if message.get("msg") == "process_completed":
                return "served" if message.get("success") else f"error: {message.get('output')}"
    return "error: the event stream ended without an answer"


def make_tab(url: str) -> Tab:
    """A `Tab` with `/edit`'s parameters in order (from the API description) and an uploaded image."""
    client = Client(url, verbose=False)
    try:
        parameters = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/edit"]["parameters"]
    finally:
        client.close()
    config = httpx.get(f"{url}config", timeout=30).json()
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "edit")
    files = {"files": (IMAGE.name, IMAGE.read_bytes())}
    uploaded = httpx.post(f"{url}gradio_api/upload", files=files, timeout=30).json()
    return Tab(url, fn_index, parameters, uploaded[0])


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def figures(outcomes: list[Outcome], traces: dict[str, Trace], wall_s: float) -> dict[str, Any]:
    """The load figures: counts by answer, waits, and the steps run after each cancel."""
    by_prompt = {o.index: traces.get(f"load client {o.index}") for o in outcomes}
    served = [o for o in outcomes if o.answer == "served"]
    waits = [by_prompt[o.index].started - o.submitted for o in served if by_prompt[o.index] is not None]
    results = [o.done - o.submitted for o in served]
    after_server, after_client, stopped, dropped, finished = [], [], 0, 0, 0
    for o in outcomes:
        trace = by_prompt[o.index]
        if o.cancelled_at is None:
            continue
        if trace is None:
            dropped += 1  # never reached the editor
            continue
        stopped += trace.outcome == "CancelledError"
        finished += trace.outcome == "ok" and trace.ended > o.cancelled_at  # ran to its end despite the cancel
        set_at = getattr(trace.job, "set_at", None)
        if set_at is not None:
            after_server.append(sum(t > set_at for t in trace.steps))
        after_client.append(sum(t > o.cancelled_at for t in trace.steps))
    answers = [o.answer for o in outcomes]
    rounded = lambda v: None if v is None else round(v, 3)  # noqa: E731
    return {
        "clients": len(outcomes),
        "queue_size": QUEUE_SIZE,
        "served": answers.count("served"),
        "refused": answers.count("refused"),
        "cancelled": answers.count("cancelled"),
        "disconnected": answers.count("disconnected"),
        "errors": sorted(a for a in answers if a.startswith("error")),
        "cancelled_edits": {"stopped_at_next_step": stopped, "dropped_before_start": dropped, "finished": finished},
        "wait_start_s": {"p50": rounded(_percentile(waits, 50)), "p95": rounded(_percentile(waits, 95))},
        "wait_result_s": {"p50": rounded(_percentile(results, 50)), "p95": rounded(_percentile(results, 95))},
        "steps_after_cancel_event": {"max": max(after_server, default=0), "total": sum(after_server)},
        "steps_after_client_cancel": {
            "p50": _percentile(after_client, 50),
            "max": max(after_client, default=0),
            "total": sum(after_client),
        },
        "edit_outcomes": sorted({t.outcome for t in traces.values() if t.prompt.startswith("load client")}),
        "wall_s": round(wall_s, 1),
        "seed": SEED,
    }


@pytest.fixture()
def timed_cancels(monkeypatch):
    """Record when each edit's cancel event is first set (`Job.set_at`, `time.monotonic`)."""
    original = jobs.Job.set

    def set_and_record(job: jobs.Job) -> None:
        if not hasattr(job, "set_at"):
            job.set_at = time.monotonic()
        original(job)

    monkeypatch.setattr(jobs.Job, "set", set_and_record)


def run_clients(url: str, plans: list[Plan], log: StepLog) -> list[Outcome]:
    """Every client at its arrival time, all at once in threads; their outcomes in plan order.

    The gradio_client clients connect before the clock starts (connecting is not what is measured).
    """
    tab = make_tab(url)
    callers = [plan.index for plan in plans if plan.kind != "disconnect"]
    with ThreadPoolExecutor(8) as pool:
        clients = dict(zip(callers, pool.map(lambda _: Client(url, verbose=False), callers), strict=True))
    start = time.monotonic() + 0.5

    def one(plan: Plan) -> Outcome:
        time.sleep(max(0.0, start + plan.arrive_s - time.monotonic()))
        try:
            if plan.kind == "disconnect":
                return tab.run(plan, log)
            return run_gradio_client(clients[plan.index], plan, log)
        except Exception as exc:  # noqa: BLE001  (any other end is a failure the test reports)
            return Outcome(plan.index, plan.kind, f"error: {exc!r}", submitted=time.monotonic())

    try:
        with ThreadPoolExecutor(len(plans)) as pool:
            return list(pool.map(one, plans, timeout=ANSWER_S * 2))
    finally:
        with ThreadPoolExecutor(8) as pool:  # each close waits up to 1 s for its heartbeat thread
            list(pool.map(Client.close, clients.values()))


def test_fifty_clients_with_cancels_and_disconnects(tiny_editor, timed_cancels, caplog, tmp_path):
    plans = make_plans()
    log = StepLog(tiny_editor)
    demo, url = launch(log, queue_size=QUEUE_SIZE)
    started = time.monotonic()
    try:
        with caplog.at_level(logging.INFO, logger="qie.requests"):
            outcomes = run_clients(url, plans, log)
            quiet = time.monotonic() + ANSWER_S  # cancelled edits may still be stopping: wait for every one
            while any(t.ended is None for t in list(log.traces.values())) and time.monotonic() < quiet:
                time.sleep(0.05)
            after = Client(url, verbose=False).predict(
                image=handle_file(str(IMAGE)), **{**SERVE, "prompt": "after"}, api_name="/edit"
            )
        report = figures(outcomes, log.traces, time.monotonic() - started)
        report["request_log"] = _request_log_outcomes(caplog.records)
        report["timeline"] = timeline(outcomes, log.traces, started)
    finally:
        close(demo)
    path = Path(os.environ.get("QIE_LOAD_REPORT") or tmp_path / "load.json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(_summary(report), f"(figures in {path})")

    assert not report["errors"], report["errors"]  # every client got an answer or a clean refusal
    assert report["served"] + report["refused"] + report["cancelled"] + report["disconnected"] == CLIENTS
    assert report["served"] >= 1 and report["refused"] >= 1, report  # the burst filled the queue; it drained
    assert set(report["edit_outcomes"]) <= {"ok", "CancelledError"}, report["edit_outcomes"]
    assert not {"error", "failed"} & set(report["request_log"]), report["request_log"]  # 0 internal errors
    # Compute spent on cancelled work: at most the step in flight when the cancel event was set ...
    assert report["steps_after_cancel_event"]["max"] <= 1, report
    # ... and no cancelled edit ran to its end (100 steps asked; each was cancelled while waiting or by step 10).
    assert report["cancelled_edits"]["finished"] == 0, report
    assert report["cancelled_edits"]["stopped_at_next_step"] >= 3, report  # the measure above is not vacuous
    assert after[2]  # and the app still edits


def timeline(outcomes: list[Outcome], traces: dict[str, Trace], origin: float) -> list[dict[str, Any]]:
    """Each client's request, in seconds from `origin`: submitted, cancelled, edit start and end, steps run."""
    at = lambda t: None if t is None else round(t - origin, 3)  # noqa: E731
    rows = []
    for o in outcomes:
        trace = traces.get(f"load client {o.index}")
        row = {"client": o.index, "kind": o.kind, "answer": o.answer, "submitted": at(o.submitted)}
        row.update(cancelled=at(o.cancelled_at), done=at(o.done))
        if trace is not None:
            row.update(started=at(trace.started), ended=at(trace.ended), steps=len(trace.steps), edit=trace.outcome)
            row["cancel_event"] = at(getattr(trace.job, "set_at", None))
        rows.append(row)
    return rows


def _request_log_outcomes(records: list[logging.LogRecord]) -> dict[str, int]:
    """Request-log lines (`qie.requests`) counted by outcome."""
    counts: dict[str, int] = {}
    for record in records:
        if record.name == "qie.requests":
            outcome = json.loads(record.getMessage())["outcome"]
            counts[outcome] = counts.get(outcome, 0) + 1
    return dict(sorted(counts.items()))


def _summary(report: dict[str, Any]) -> str:
    return (
        f"load: {report['clients']} clients in {report['wall_s']}s: {report['served']} served, "
        f"{report['refused']} refused, {report['cancelled']} cancelled, {report['disconnected']} disconnected; "
        f"wait to start p50 {report['wait_start_s']['p50']}s p95 {report['wait_start_s']['p95']}s, "
        f"to result p50 {report['wait_result_s']['p50']}s p95 {report['wait_result_s']['p95']}s; "
        f"steps after cancel: max {report['steps_after_cancel_event']['max']} per edit after the cancel event, "
        f"{report['steps_after_client_cancel']['total']} in all after the clients' cancels"
    )
