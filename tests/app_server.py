"""Start the web app in-process on 127.0.0.1 (for the API and browser tests)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(editor=None, *, factory=None, **kwargs):
    """Build the app around `editor` (or `factory`) and serve it; returns (demo, url). Stop it with `close`."""
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


def close(demo) -> None:
    """`demo.close()`, with the server's stop event set on the server's own event loop first.

    gradio's `close` sets that `asyncio.Event` from the calling thread, racing the loop that resumes its
    waiters (the heartbeat streams): "RuntimeError: deque mutated during iteration" in a test's teardown.
    Set on its loop first, the event is already set when `close` sets it, which then does nothing.
    """
    event = getattr(getattr(demo, "app", None), "stop_event", None)
    loop = getattr(event, "_loop", None)  # asyncio binds an Event to its loop at the first wait
    if loop is not None and loop.is_running():
        done = threading.Event()
        loop.call_soon_threadsafe(lambda: (event.set(), done.set()))
        done.wait(5)
    demo.close()


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "the expected state") -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"did not reach {what} within {timeout:.0f}s")
        time.sleep(0.05)
