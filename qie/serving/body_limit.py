"""An ASGI middleware for Serve's HTTP proxy: a request body over the limit is refused as it streams in.

The replica checks the limit too (`qie.serving.service.read_body`), but Ray Serve's proxy forwards
a body to the replica as it arrives, so without this the proxy and the replica both hold whatever
a client streams. Here the proxy stops reading at the limit, tells the application the client is
gone, and answers 400 itself.

`qie serve` installs it through Ray's `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` (see
`proxy_middlewares`); with `serve run`, set that variable to `PROXY_CALLBACK` yourself.

Example:
    >>> proxy_middlewares()[0].cls.__name__
    'BodyLimit'
"""

from __future__ import annotations

import json
from typing import Any

Scope = dict[str, Any]
MAX_BODY_BYTES = 64 * 2**20
PROXY_CALLBACK = "qie.serving.body_limit.proxy_middlewares"


def proxy_middlewares() -> list[Any]:
    """The middlewares Serve's HTTP proxy wraps its application in (Ray calls this by import path)."""
    from starlette.middleware import Middleware

    return [Middleware(BodyLimit, limit=MAX_BODY_BYTES)]


class BodyLimit:
    """Refuses HTTP bodies larger than `limit` bytes, whether declared (Content-Length) or streamed."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(send, f"<{declared.decode(errors='replace')[:20]} bytes>")
            return
        seen, over, started = 0, False, False

        async def limited() -> dict[str, Any]:
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = True  # the application sees a client that left; nothing more is read
                    return {"type": "http.disconnect"}
            return message

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            if over and not started:
                return  # the refusal below answers instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited, tracked)
        if over and not started:
            await self._refuse(send, f"<more than {self.limit} bytes>")

    async def _refuse(self, send: Any, shown: str) -> None:
        body = json.dumps(
            {
                "error": "InvalidRequestError",
                "message": f"body={shown!r} is not valid: send at most {self.limit // 2**20} MiB",
                "param": "body",
                "value": shown,
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 400, "headers": headers})
        await send({"type": "http.response.body", "body": body})
