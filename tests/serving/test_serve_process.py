"""`python -m qie serve` as a process: Ray's ports on loopback only, and SIGTERM delivers the edit in flight.

Slow (Ray starts and the tiny model loads in a fresh process): one server serves both checks.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import EXAMPLES, ROOT
from redis_server import free_port

psutil = pytest.importorskip("psutil")
pytest.importorskip("ray.serve")


def listening(pid: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of `pid` and its descendants."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    out = []
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out += [(c.laddr.ip, c.laddr.port, proc.name()) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def get(url: str, timeout: float = 5):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, resp.read()


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "qie", "serve", "--model", "tiny", "--cache", "off", "--port", str(port)]
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            try:
                if get(url)[0] == 200:
                    break
            except (OSError, urllib.error.URLError):
                time.sleep(1)
        else:
            log.seek(0)
            pytest.fail(f"serve did not come up:\n{log.read()[-3000:]}")
        yield proc, url, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def test_ray_and_serve_listen_on_loopback_only(server):
    proc, _, _ = server
    sockets = listening(proc.pid)
    assert len(sockets) >= 4, sockets  # GCS, raylet, workers, HTTP proxy, metrics
    exposed = [s for s in sockets if not is_loopback(s[0])]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_oversized_chunked_body_is_refused_while_streaming(server):
    import http.client

    proc, url, _ = server
    port = int(url.rsplit(":", 1)[1].strip("/"))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    chunks = (b"x" * 2**20 for _ in range(100))  # 100 MiB, no Content-Length
    conn.request("POST", "/", body=chunks, headers={"Content-Type": "application/json"}, encode_chunked=True)
    answer = conn.getresponse()
    body = json.loads(answer.read())
    assert answer.status == 400 and body["param"] == "body" and "64 MiB" in body["message"], body


def test_sigterm_drains_and_delivers_the_edit_in_flight(server):
    proc, url, log = server
    photo = base64.b64encode((EXAMPLES / "coffee-cup.jpg").read_bytes()).decode()
    body = {"images": [photo], "prompt": "white background", "steps": 6, "seed": 3, "max_side": 256}
    answer: dict = {}

    def post() -> None:
        request = urllib.request.Request(
            url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as resp:
                answer.update(status=resp.status, body=resp.read())
        except Exception as exc:  # noqa: BLE001 - the test reports whatever the client saw
            answer.update(error=repr(exc))

    client = threading.Thread(target=post)
    client.start()
    time.sleep(3)  # the edit is running in the replica now
    proc.send_signal(signal.SIGTERM)
    client.join(300)
    assert answer.get("status") == 200, answer
    assert answer["body"][:8] == b"\x89PNG\r\n\x1a\n"
    assert proc.wait(120) == 0
    log.seek(0)
    assert "finishing the edits in flight" in log.read()
