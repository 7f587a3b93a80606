"""Start the web app in-process on 127.0.0.1 (for the API and browser tests)."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(editor, **kwargs):
    """Build the app around `editor` and serve it; returns (demo, url). Close with `demo.close()`."""
    import app

    demo = app.build_demo(lambda: editor, **kwargs)
    _, url, _ = demo.launch(
        prevent_thread_lock=True,
        server_name="127.0.0.1",
        server_port=free_port(),
        quiet=True,
        **app.launch_options(lambda: editor),
    )
    return demo, url
