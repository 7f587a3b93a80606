"""The web app under bad input, overload, faults and timeouts; health, metrics, upload limits, file serving."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from app_server import close, launch
from conftest import EXAMPLES
from crafted_images import animated, raw_png
from PIL import Image

from qie.core import faults

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from gradio_client.utils import QueueError  # noqa: E402

CHEAP = {"steps": 2, "max_side": 96, "condition_area": "output"}
CLIENTS = 20


@pytest.fixture(scope="module")
def served(tiny_editor):
    demo, url = launch(tiny_editor, metrics=True)
    yield url
    close(demo)


def edit(client, image=EXAMPLES / "coffee-cup.jpg", **kw):
    params = {"prompt": "pure white background", **CHEAP, **kw}
    return client.predict(image=handle_file(str(image)), **params, api_name="/edit")


def health(url: str) -> dict:
    response = httpx.get(url.rstrip("/") + "/health", timeout=10)
    assert response.status_code == 200
    return response.json()


def test_health_and_metrics(served):
    client = Client(served, verbose=False)
    status = health(served)
    assert status["status"] == "ready" and status["model"] == "tiny" and status["busy"] is False
    edit(client)
    view = client.predict(api_name="/metrics")
    assert view["requests"]["ok"] >= 1 and view["p50_s"] > 0 and view["rss_gib"] > 0
    assert "recent" not in view  # aggregate figures only: never other visitors' edits


BAD_UPLOADS = [
    ("empty.png", b"", "empty"),
    ("corrupt.png", b"\x89PNG\r\n\x1a\n" + b"junk" * 50, "cannot be read as an image"),
    ("tiny.png", None, "at least 8 px"),
    ("bomb.png", raw_png(30000, 2000), "more than the limit"),
]


def test_bad_inputs_through_the_api(served, tmp_path):
    client = Client(served, verbose=False)
    one_pixel = io.BytesIO()
    Image.new("RGB", (1, 1)).save(one_pixel, format="PNG")
    for name, data, words in BAD_UPLOADS:
        path = tmp_path / name
        path.write_bytes(one_pixel.getvalue() if data is None else data)
        with pytest.raises(AppError, match=words) as info:
            edit(client, image=path)
        assert "Traceback" not in str(info.value)
    for params, words in [({"prompt": "\x00\x01 "}, "describe the edit"), ({"steps": 1000}, "from 2 to 100")]:
        with pytest.raises(AppError, match=words):
            edit(client, **params)
    gif = tmp_path / "anim.gif"
    gif.write_bytes(animated("GIF"))
    assert edit(client, image=gif)[2]  # first frame, edited
    assert "denoise" in edit(client)[2]  # and the app goes on


def test_upload_limit_and_file_serving(tiny_editor, tmp_path, monkeypatch):
    monkeypatch.setenv("QIE_MAX_INPUT_BYTES", "20000")
    demo, url = launch(tiny_editor)
    try:
        assert demo.delete_cache == (3600, 3600)  # Gradio's cache of uploads and results is cleaned hourly
        big = tmp_path / "big.png"
        Image.effect_noise((256, 256), 64).convert("RGB").save(big)  # ~190 kB: over the limit
        response = httpx.post(url + "gradio_api/upload", files={"files": ("big.png", big.read_bytes())})
        assert response.status_code == 413
        for path in ("/etc/passwd", str(EXAMPLES.parent / "app.py")):
            response = httpx.get(f"{url}gradio_api/file={path}")
            assert response.status_code in (403, 404), path
    finally:
        close(demo)


def test_concurrent_clients_get_a_result_or_busy_and_the_server_stays_healthy(tiny_editor):
    demo, url = launch(tiny_editor, queue_size=8)
    outcomes: list[str] = []
    health_times: list[float] = []
    stop = threading.Event()

    def one(i: int) -> str:
        client = Client(url, verbose=False)
        try:
            return "ok" if edit(client, prompt=f"edit {i}")[2] else "empty"
        except QueueError as exc:
            assert "full" in str(exc).lower()
            return "busy"

    def watch_health() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            assert health(url)["status"] == "ready"
            health_times.append(time.perf_counter() - start)
            time.sleep(0.2)

    try:
        watcher = threading.Thread(target=watch_health)
        watcher.start()
        started = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            outcomes = list(pool.map(one, range(CLIENTS), timeout=240))
        elapsed = time.perf_counter() - started
        stop.set()
        watcher.join(30)
        assert sorted(set(outcomes)) <= ["busy", "ok"] and len(outcomes) == CLIENTS
        assert outcomes.count("ok") >= 9  # the one running + the 8 queued, at least
        assert health_times and max(health_times) < 5  # health answered during the burst
        assert elapsed < 240
        assert health(url)["busy"] is False
        assert edit(Client(url, verbose=False))[2]
    finally:
        stop.set()
        close(demo)
    print(f"{CLIENTS} clients: {outcomes.count('ok')} served, {outcomes.count('busy')} busy, {elapsed:.1f}s")


def test_price_tag_edit_that_fails_falls_back_to_the_template(served, tiny_editor):
    client = Client(served, verbose=False)
    prompt = "Add a red price tag that says 'Sale $19.9' in the bottom right corner"
    with faults.inject(tiny_editor.pipe.transformer, error="runtime"):
        before_after, png, stats, _ = edit(client, prompt=prompt, price_tag="Sale $19.9")
    assert "plan template" in stats and "price tag drawn from a template because the edit failed" in stats
    with Image.open(png) as image:
        assert image.size == (96, 64)
    with faults.inject(tiny_editor.pipe.transformer, error="runtime"), pytest.raises(AppError):
        edit(client, prompt="pure white background", price_tag="Sale $19.9")  # not a price-tag edit: no fallback


def test_edit_past_its_time_limit_is_stopped(served, monkeypatch):
    from qie.app import main as app

    monkeypatch.setattr(app, "EDIT_TIMEOUT_S", 0.01)  # below one step on any machine: the tiny model is fast
    client = Client(served, verbose=False)
    started = time.perf_counter()
    with pytest.raises(AppError, match="ran past its limit of 0s|ran past its limit of 1s"):
        edit(client, steps=100)
    assert time.perf_counter() - started < 30
    monkeypatch.setattr(app, "EDIT_TIMEOUT_S", 900.0)
    assert edit(client)[2]


def test_a_tile_size_that_is_not_a_choice_gets_a_clear_message(served, caplog):
    client = Client(served, verbose=False)
    with caplog.at_level("ERROR"), pytest.raises(AppError, match="VAE tile size: tile_size='abc'.*use one of off, 256"):
        edit(client, tile_size="abc")
    assert "Traceback" not in caplog.text


def test_a_full_disk_gives_a_clear_message_and_leaves_no_partial_file(served, monkeypatch):
    from PIL import Image as PILImage

    from qie.app.handlers import output_dir

    real_save = PILImage.Image.save

    def disk_full(self, fp, *args, **kwargs):
        if str(fp).endswith(".png.partial"):
            with open(fp, "wb") as fh:
                fh.write(b"\x89PNG half")  # a half-written file, then the disk is full
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(PILImage.Image, "save", disk_full)
    client = Client(served, verbose=False)
    with pytest.raises(AppError, match="disk is full.*try again later"):
        edit(client)
    assert not list(output_dir().glob("*.partial"))
    monkeypatch.setattr(PILImage.Image, "save", real_save)
    assert edit(client)[2]


def test_the_hourly_cleanup_also_removes_partial_files():
    import os

    from qie.app.handlers import OUTPUT_TTL_S, output_dir

    folder = output_dir()
    old = time.time() - OUTPUT_TTL_S - 60
    stale = [folder / "qie-1-stale.png", folder / "qie-2-stale.png.partial"]
    fresh = folder / "qie-3-fresh.png.partial"
    for path in (*stale, fresh):
        path.write_bytes(b"x")
    for path in stale:
        os.utime(path, (old, old))
    output_dir()
    assert not any(path.exists() for path in stale) and fresh.exists()
    fresh.unlink()


def test_every_refused_input_is_one_request_log_line(served, caplog):
    import json

    client = Client(served, verbose=False)
    with caplog.at_level("INFO", logger="qie.requests"):
        for params in ({"prompt": "   "}, {"steps": 1000}, {"tile_size": "abc"}):
            with pytest.raises(AppError):
                edit(client, **params)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "qie.requests"]
    refused = [line for line in lines if line["outcome"] == "invalid"]
    assert [line["param"] for line in refused] == ["prompt", "steps", "tile_size"]
    assert all(line["channel"] == "app" and "   " not in json.dumps(line) for line in refused)
