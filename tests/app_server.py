"""Start the web app in-process on 127.0.0.1 (for the API and browser tests)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(editor=None, *, factory=None, **kwargs):
    """Build the app around `editor` (or `factory`) and serve it; returns (demo, url). Close with `demo.close()`."""
    from qie.app import main as app

    demo = app.build_demo(factory or (lambda: editor), **kwargs)
    _, url, _ = demo.launch(
        prevent_thread_lock=True,
        server_name="127.0.0.1",
        server_port=free_port(),
        quiet=True,
        **app.launch_options(lambda: editor),
    )
    return demo, url


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "the expected state") -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"did not reach {what} within {timeout:.0f}s")
        time.sleep(0.05)
