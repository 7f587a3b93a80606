"""The app opens only files Gradio received for the request: a server path in a file dict is refused."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from app_server import close, launch
from conftest import EXAMPLES

from qie.app.uploads import REFUSED, received_path, upload_folder

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

CHEAP = {"steps": 2, "max_side": 96, "condition_area": "output"}


@pytest.fixture(scope="module")
def served(tiny_editor):
    demo, url = launch(tiny_editor)
    yield url
    close(demo)


@pytest.fixture(scope="module")
def secret(tmp_path_factory) -> Path:
    """A readable image outside Gradio's folders: what an attacker would like to read back."""
    path = tmp_path_factory.mktemp("server") / "secret.jpg"
    shutil.copy(EXAMPLES / "cat.jpg", path)
    return path


def refused_message(client: Client, channel: str, value, api_name: str = "/edit") -> str:
    params = {"prompt": "white background", **CHEAP} if api_name == "/edit" else {"prompt": "white background"}
    image = handle_file(str(EXAMPLES / "coffee-cup.jpg"))
    if channel == "image":
        params["image"] = value
    else:
        params["image"], params[channel] = image, value
    with pytest.raises(AppError) as info:
        client.predict(**params, api_name=api_name)
    return str(info.value)


@pytest.mark.parametrize("channel", ["image", "image_2", "image_3"])
def test_a_server_path_without_gradio_marker_is_refused_in_every_image_input(served, secret, channel):
    client = Client(served, verbose=False)
    existing = refused_message(client, channel, {"path": str(secret)})
    missing = refused_message(client, channel, {"path": str(secret.with_name("nope.jpg"))})
    assert REFUSED in existing
    # One message whether or not the file exists; the folder is never echoed.
    assert existing.replace("secret.jpg", "X") == missing.replace("nope.jpg", "X")
    assert str(secret.parent) not in existing
    as_string = refused_message(client, channel, str(secret))  # Gradio's own check refuses a bare string
    assert str(secret.parent) not in as_string


def raw_call(url: str, api_name: str, data: list) -> str:
    """Call an endpoint over plain HTTP (no client-side upload), returning the event stream's text."""
    posted = httpx.post(f"{url}gradio_api/call/{api_name}", json={"data": data}, timeout=30)
    posted.raise_for_status()
    return httpx.get(f"{url}gradio_api/call/{api_name}/{posted.json()['event_id']}", timeout=60).text


def test_a_forged_marker_outside_the_upload_folder_is_refused(served, secret):
    forged = {"path": str(secret), "meta": {"_type": "gradio.FileData"}, "orig_name": "secret.jpg"}
    for image in (forged, {"path": str(secret)}):
        stream = raw_call(served, "edit", [image, None, None, "white background"])
        assert "event: error" in stream and "event: complete" not in stream
        assert "secret.jpg" not in stream.replace('"orig_name": "secret.jpg"', "") or REFUSED in stream


def test_the_examples_endpoint_refuses_server_paths(served, secret):
    client = Client(served, verbose=False)
    for value in ({"path": str(secret)}, str(secret)):
        with pytest.raises(AppError):
            client.predict(value, "white background", api_name="/edit_example")


def test_links_and_dot_dot_out_of_the_upload_folder_are_refused(secret):
    folder = upload_folder()
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / f"qie-test-link-{os.getpid()}.jpg"
    link.unlink(missing_ok=True)
    link.symlink_to(secret)
    try:
        marked = {"meta": {"_type": "gradio.FileData"}}
        for path in (str(link), str(folder / ".." / secret.relative_to(secret.anchor))):
            with pytest.raises(ValueError, match="only images uploaded with this request"):
                received_path({**marked, "path": path}, "image")
        inside = folder / f"qie-test-{os.getpid()}.jpg"
        shutil.copy(secret, inside)
        try:
            assert received_path({**marked, "path": str(inside)}, "image") == str(inside.resolve())
            with pytest.raises(ValueError):  # no marker: Gradio did not check it for this request
                received_path({"path": str(inside)}, "image")
        finally:
            inside.unlink()
    finally:
        link.unlink()


def test_a_real_upload_still_works(served):
    client = Client(served, verbose=False)
    result = client.predict(
        image=handle_file(str(EXAMPLES / "cat.jpg")), prompt="white background", **CHEAP, api_name="/edit"
    )
    assert "denoise" in result[2]


def test_the_region_brush_layers_must_be_received_files_too(secret):
    from qie.app.form import region_mask_of

    for layer in ({"path": str(secret)}, {"path": str(secret), "meta": {"_type": "gradio.FileData"}}):
        with pytest.raises(ValueError, match="only images uploaded with this request"):
            region_mask_of({"background": None, "layers": [layer], "composite": None}, str(secret))
