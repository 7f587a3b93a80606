"""The web app through its HTTP API: the app runs in-process on 127.0.0.1 with the tiny editor."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from app_server import close, launch, wait_until
from conftest import EXAMPLES

import qie
from qie.app.presets import FEATURES, feature_available
from qie.core.images import read_png_metadata

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from gradio_client.utils import QueueError  # noqa: E402

CHEAP = {"steps": 2, "max_side": 128, "condition_area": "output"}


class RecordingEditor:
    """The tiny editor, recording how each edit ended (to see cancellation reach the GPU loop)."""

    def __init__(self, editor):
        self._editor = editor
        self.outcomes: list[str] = []
        self.prompts: list[str] = []  # in the order the editor ran them
        self.finished = threading.Event()

    def __getattr__(self, name):
        return getattr(self._editor, name)

    def edit(self, request, **kwargs):
        self.prompts.append(request.prompt)
        try:
            result = self._editor.edit(request, **kwargs)
        except qie.QieError as exc:
            self.outcomes.append(type(exc).__name__)
            raise
        else:
            self.outcomes.append("ok")
            return result
        finally:
            self.finished.set()


@pytest.fixture(scope="module")
def recorder(tiny_editor):
    return RecordingEditor(tiny_editor)


@pytest.fixture(scope="module")
def served(recorder):
    demo, url = launch(recorder)
    yield url
    close(demo)


@pytest.fixture()
def client(served):
    return Client(served, verbose=False)


def edit(client, image=EXAMPLES / "coffee-cup.jpg", **kw):
    params = {"prompt": "pure white background", **CHEAP, **kw}
    return client.predict(image=handle_file(str(image)), **params, api_name="/edit")


def test_edit_returns_png_with_metadata_and_stats(client):
    before_after, png, stats, seed = edit(client, seed=7, randomize_seed=False)
    meta = read_png_metadata(png)
    from PIL import Image

    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == (128, 96)
    assert meta["prompt"] == "pure white background" and meta["seed"] == 7 and meta["steps"] == 2
    assert meta["model"] == "tiny"
    assert seed == 7
    assert "denoise" in stats and "seed 7" in stats and "plan resident" in stats
    with Image.open(before_after[0]) as before, Image.open(before_after[1]) as after:
        assert before.size == after.size == (128, 96)


def test_bad_requests_give_readable_errors_and_the_app_keeps_working(client, tmp_path):
    with pytest.raises(AppError, match="prompt=.*describe the edit"):
        edit(client, prompt="   ")
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text, not a picture")
    with pytest.raises(AppError, match="cannot be read as an image.*PNG, JPEG or WebP"):
        edit(client, image=not_image)
    with pytest.raises(AppError, match="steps='many' is not valid: give a number"):
        edit(client, steps="many")
    if not feature_available(FEATURES["tile_size"]):  # a disabled toggle refuses values instead of ignoring them
        with pytest.raises(AppError, match="tile_size=.*not available in this build"):
            edit(client, tile_size="512")
    assert edit(client)[3] >= 0


def test_three_concurrent_clients_are_served_in_order(served, recorder):
    clients = [Client(served, verbose=False) for _ in range(3)]
    jobs = []
    for i, cl in enumerate(clients):
        job = cl.submit(image=handle_file(str(EXAMPLES / "cat.jpg")), prompt=f"edit {i}", **CHEAP, api_name="/edit")
        jobs.append(job)
        wait_until(lambda job=job: job.status().code.name in ("IN_QUEUE", "PROCESSING", "PROGRESS", "FINISHED"))
    results = [job.result(timeout=120) for job in jobs]
    assert all("denoise" in stats for _, _, stats, _ in results)
    assert [p for p in recorder.prompts if p.startswith("edit ")] == ["edit 0", "edit 1", "edit 2"]


def test_progress_reports_denoising_steps(client):
    job = client.submit(
        image=handle_file(str(EXAMPLES / "cat.jpg")), prompt="blue sky", **{**CHEAP, "steps": 6}, api_name="/edit"
    )
    seen = set()
    while not job.done():
        status = job.status()
        for unit in status.progress_data or []:
            seen.add((unit.unit, unit.length))
        time.sleep(0.05)
    job.result()
    assert ("steps", 6) in seen


def test_cancel_stops_denoising_and_frees_the_editor(client, recorder, tiny_editor):
    recorder.finished.clear()
    job = client.submit(
        image=handle_file(str(EXAMPLES / "rocket.jpg")), prompt="night sky", **{**CHEAP, "steps": 100}, api_name="/edit"
    )
    wait_until(lambda: tiny_editor.lock.locked())
    started = time.perf_counter()
    assert client.predict(api_name="/cancel").startswith("Cancelled")
    assert recorder.finished.wait(30)
    assert recorder.outcomes[-1] == "CancelledError"
    assert time.perf_counter() - started < 10  # stopped at the next step, not after 100
    assert not tiny_editor.lock.locked()
    with pytest.raises(Exception):  # noqa: B017  (the client reports the cancelled job in its own way)
        job.result(timeout=30)
    assert edit(client)[2]


def test_full_queue_says_busy(tiny_editor):
    demo, url = launch(tiny_editor, queue_size=1)
    try:
        with tiny_editor.lock:  # the GPU is busy: the first job waits on the editor, the second in the queue
            clients = [Client(url, verbose=False) for _ in range(3)]
            image = handle_file(str(EXAMPLES / "cat.jpg"))
            first = clients[0].submit(image=image, prompt="a", **CHEAP, api_name="/edit")
            wait_until(lambda: first.status().code.name in ("PROCESSING", "PROGRESS"))
            second = clients[1].submit(image=image, prompt="b", **CHEAP, api_name="/edit")
            wait_until(lambda: second.status().code.name == "IN_QUEUE")
            with pytest.raises(QueueError, match="[Qq]ueue is full.*try again"):
                clients[2].predict(image=image, prompt="c", **CHEAP, api_name="/edit")
        assert first.result(timeout=60)[2] and second.result(timeout=60)[2]
    finally:
        close(demo)


def test_gradio_cancel_stops_the_edit_within_a_step_and_frees_the_queue(client, recorder, tiny_editor):
    recorder.finished.clear()
    job = client.submit(
        image=handle_file(str(EXAMPLES / "cat.jpg")), prompt="slow", **{**CHEAP, "steps": 100}, api_name="/edit"
    )
    wait_until(lambda: tiny_editor.lock.locked())
    started = time.perf_counter()
    job.cancel()  # gradio_client's own cancel: Gradio cancels its task; the edit must stop too
    assert recorder.finished.wait(30)
    stopped_s = time.perf_counter() - started
    assert recorder.outcomes[-1] == "CancelledError"
    assert stopped_s < 10, stopped_s  # at the next step, not after 100
    started = time.perf_counter()
    assert edit(client)[2]  # the next edit does not wait behind the cancelled one
    print(f"cancelled edit stopped after {stopped_s:.2f}s; next edit {time.perf_counter() - started:.2f}s")


def _fn_index(url: str, api_name: str) -> int:
    config = httpx.get(f"{url}config", timeout=10).json()
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)


def test_a_client_that_disconnects_stops_its_edit(served, recorder, tiny_editor):
    """A browser tab that closes mid-edit: its event stream drops and the edit stops at the next step."""
    files = httpx.post(
        f"{served}gradio_api/upload", files={"files": ("cat.jpg", (EXAMPLES / "cat.jpg").read_bytes())}, timeout=30
    ).json()
    image = {"path": files[0], "meta": {"_type": "gradio.FileData"}, "orig_name": "cat.jpg"}
    session = "disconnecting-tab"
    data = [image, None, None, "slow", " ", 100, 4.0, 0, True, 128, False, "output", "quality", "off", "off", False, ""]
    recorder.finished.clear()
    joined = httpx.post(
        f"{served}gradio_api/queue/join",
        json={"data": data, "fn_index": _fn_index(served, "edit"), "session_hash": session, "trigger_id": None},
        timeout=30,
    )
    assert joined.status_code == 200, joined.text
    with httpx.stream("GET", f"{served}gradio_api/queue/data", params={"session_hash": session}, timeout=60) as sse:
        for line in sse.iter_lines():
            if "progress" in line and tiny_editor.lock.locked():
                break  # denoising: now the tab goes away
    started = time.perf_counter()
    assert recorder.finished.wait(30)
    assert recorder.outcomes[-1] == "CancelledError"
    assert time.perf_counter() - started < 10


def test_cancel_also_drops_this_sessions_waiting_edit(client, recorder, tiny_editor):
    image = handle_file(str(EXAMPLES / "cat.jpg"))
    running = client.submit(image=image, prompt="running one", **{**CHEAP, "steps": 100}, api_name="/edit")
    wait_until(lambda: tiny_editor.lock.locked())
    waiting = client.submit(image=image, prompt="waiting one", **CHEAP, api_name="/edit")
    wait_until(lambda: waiting.status().code.name == "IN_QUEUE")
    assert client.predict(api_name="/cancel").startswith("Cancelled")
    for job in (running, waiting):
        with pytest.raises(Exception):  # noqa: B017  (both end without a result)
            job.result(timeout=60)
    assert "waiting one" not in recorder.prompts  # dropped before it reached the editor
    assert edit(client)[2]


def test_cache_hits_never_reach_the_page(client):
    """A cache hit would tell one visitor that someone else sent the same image and prompt."""
    first = edit(client, prompt="same prompt twice", seed=3, randomize_seed=False)[2]
    second = edit(client, prompt="same prompt twice", seed=3, randomize_seed=False)[2]
    assert "cache hit" not in first + second
    assert "denoise" in second
