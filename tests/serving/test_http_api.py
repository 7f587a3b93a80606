"""The HTTP API's parsing without Ray: masks only as request data, malformed input as a named 400,
the body limit on chunked streams, and property-based fuzzing of JSON and multipart bodies.

A replica object runs without Serve; its edit step (`_answer`) is replaced, so no model is needed.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import string

import pytest
from conftest import EXAMPLES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from starlette.requests import Request
from starlette.responses import Response
from starlette.testclient import TestClient

pytest.importorskip("ray.serve")

from qie.core.request import EditRequest  # noqa: E402
from qie.errors import InvalidRequestError  # noqa: E402
from qie.serving import service  # noqa: E402
from qie.serving.service import EditDeployment, parse_http  # noqa: E402

PHOTO_PATH = EXAMPLES / "coffee-cup.jpg"
PHOTO = PHOTO_PATH.read_bytes()
PHOTO_B64 = base64.b64encode(PHOTO).decode()
SIZE = Image.open(io.BytesIO(PHOTO)).size
FIELDS = {"prompt": "replace the background with white", "steps": 3, "max_side": 128}


def mask_png(size=SIZE) -> bytes:
    mask = Image.new("L", size, 0)
    mask.paste(255, (10, 10, 60, 60))
    out = io.BytesIO()
    mask.save(out, format="PNG")
    return out.getvalue()


class Replica:
    """A replica without Serve or a model: `answer` decides what the edit step does."""

    def __init__(self, answer=None) -> None:
        self.replica = EditDeployment.func_or_class.__new__(EditDeployment.func_or_class)
        self.replica.failures, self.replica.replica = 0, "test"
        self.requests: list[EditRequest] = []

        async def default(request: EditRequest) -> Response:
            self.requests.append(request)
            return Response(b"ok", media_type="image/png")

        self.replica._answer = answer or default
        self.client = TestClient(self._asgi)

    async def _asgi(self, scope, receive, send) -> None:
        response = await self.replica(Request(scope, receive))
        await response(scope, receive, send)

    def post_json(self, body):
        return self.client.post("/", content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})

    def post_form(self, fields: list[tuple[str, str]], files: list[tuple[str, bytes]] = ()):
        boundary = "qieboundary"
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields
        ]
        for name, data in files:
            head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="f"\r\n\r\n'
            parts.append(head.encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self.client.post(
            "/", content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )


@pytest.fixture()
def api():
    return Replica()


def test_mask_is_request_data_never_a_server_path(api, tmp_path):
    # A server path (existing or not) is refused with one answer that says nothing about the file.
    answers = []
    for path in (str(PHOTO_PATH), str(tmp_path / "missing.png"), "/etc/passwd"):
        answer = api.post_json({"images": [PHOTO_B64], **FIELDS, "mask": path})
        assert answer.status_code == 400, answer.text
        answers.append({**answer.json(), "value": None})  # the value echoes the text sent, nothing more
    assert answers[0] == {**answers[1], "message": answers[0]["message"]}, answers
    assert len({a["message"].split(" is not valid: ")[1] for a in answers}) == 1, answers
    assert answers[0]["param"] == "mask" and "base64" in answers[0]["message"]
    assert not api.requests
    # As request data it works: base64 in JSON, a file part in multipart.
    ok = api.post_json({"images": [PHOTO_B64], **FIELDS, "mask": base64.b64encode(mask_png()).decode()})
    assert ok.status_code == 200, ok.text
    form = api.post_form(list(FIELDS.items()), [("images", PHOTO), ("mask", mask_png())])
    assert form.status_code == 200, form.text
    assert [r.mask.size for r in api.requests] == [SIZE, SIZE]
    refused = api.post_form([*FIELDS.items(), ("mask", str(PHOTO_PATH))], [("images", PHOTO)])
    assert refused.status_code == 400 and refused.json()["param"] == "mask"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"options": 5}, "options"),
        ({"options": [1, 2]}, "options"),
        ({"area": -1}, "area"),
        ({"area": [1]}, "area"),
        ({"area": 0.5}, "area"),
        ({"resize_to_input": "maybe"}, "resize_to_input"),
        ({"box": "1,2,3,4"}, "box"),
        ({"seed": 1e400}, "seed"),
    ],
)
def test_malformed_json_is_a_named_400_and_spares_health(api, extra, param):
    answer = api.post_json({"images": [PHOTO_B64], **FIELDS, **extra})
    assert answer.status_code == 400, answer.text
    assert answer.json()["param"] == param
    assert api.replica.failures == 0


def test_every_request_is_one_json_log_line(api, caplog):
    with caplog.at_level(logging.INFO, logger="qie.requests"):
        assert api.post_json({"images": [PHOTO_B64], **FIELDS}).status_code == 200
        assert api.post_json({"images": [PHOTO_B64], **FIELDS, "options": 5}).status_code == 400
        assert api.client.post("/", content=b"{oops").status_code == 400
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "qie.requests"]
    assert [(r["channel"], r["outcome"], r["status"]) for r in lines] == [
        ("serve", "ok", 200),
        ("serve", "invalid", 400),
        ("serve", "invalid", 400),
    ]
    assert lines[1]["param"] == "options" and "value" not in lines[1]


def test_multipart_with_too_many_fields_is_a_400(api):
    answer = api.post_form([(f"f{i}", "x") for i in range(1001)], [("images", PHOTO)])
    assert answer.status_code == 400, answer.text
    assert answer.json()["param"] == "body" and "fields" in answer.json()["message"]
    assert api.replica.failures == 0


def test_only_internal_failures_count_towards_health():
    async def broken(request):
        raise RuntimeError("device lost")

    api = Replica(broken)
    assert api.post_json({"images": [PHOTO_B64], **FIELDS, "area": -1}).status_code == 400
    assert api.replica.failures == 0
    assert api.post_json({"images": [PHOTO_B64], **FIELDS}).status_code == 500
    assert api.replica.failures == 1


def chunked(chunk: bytes, count: int, pulled: list[int]):
    """An ASGI `receive` that streams `count` chunks with no Content-Length, counting what was read."""

    async def receive():
        pulled[0] += 1
        return {"type": "http.request", "body": chunk, "more_body": pulled[0] < count}

    return receive


@pytest.mark.parametrize("kind", ["application/json", "multipart/form-data; boundary=x"])
def test_body_limit_holds_for_chunked_streams(kind, monkeypatch):
    monkeypatch.setattr(service, "MAX_BODY_BYTES", 4 * 2**20)
    pulled = [0]
    headers = [(b"content-type", kind.encode()), (b"transfer-encoding", b"chunked")]
    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers, "query_string": b""}
    request = Request(scope, chunked(b"x" * 2**20, 300, pulled))
    with pytest.raises(InvalidRequestError, match="body=") as err:
        asyncio.run(parse_http(request))
    assert err.value.param == "body" and "4 MiB" in str(err.value)
    assert pulled[0] <= 5, f"read {pulled[0]} MiB of a 300 MiB stream"


def test_bad_content_length_is_a_400(api):
    scope_headers = {"Content-Type": "application/json", "Content-Length": "abc"}
    request = Request(
        {"type": "http", "method": "POST", "path": "/", "query_string": b"",
         "headers": [(k.lower().encode(), v.encode()) for k, v in scope_headers.items()]},
        chunked(b"{}", 1, [0]),
    )  # fmt: skip
    with pytest.raises(InvalidRequestError) as err:
        asyncio.run(parse_http(request))
    assert err.value.param == "body"


# --- property-based fuzzing ----------------------------------------------------------------------
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "0", "64", "-1", "1e9", "nan", "true", "fbcache", "fast", "output", str(PHOTO_PATH)]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip
FIELD_NAMES = st.sampled_from([f for f in service.REQUEST_FIELDS if f != "images"]) | st.text(
    string.ascii_letters + "_", min_size=1, max_size=8
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def assert_named_answer(answer, api) -> None:
    assert answer.status_code in (200, 400), (answer.status_code, answer.text)
    if answer.status_code == 400:
        body = answer.json()
        assert body["param"] and body["message"], body
        assert "could not be read" not in body["message"], body  # validation named the field itself
    assert api.replica.failures == 0


@FUZZ
@given(name=FIELD_NAMES, value=JSON_VALUES)
def test_fuzz_one_json_field_gives_a_result_or_a_named_400(name, value):
    api = Replica()
    assert_named_answer(api.post_json({"images": [PHOTO_B64], **FIELDS, name: value}), api)


@FUZZ
@given(fields=st.dictionaries(FIELD_NAMES, JSON_VALUES, max_size=4), images=JSON_VALUES | st.just([PHOTO_B64]))
def test_fuzz_json_fields_give_a_result_or_a_named_400(fields, images):
    api = Replica()
    assert_named_answer(api.post_json({"images": images, **FIELDS, **fields}), api)


@FUZZ
@given(body=JSON_VALUES)
def test_fuzz_any_json_body_gives_a_named_400(body):
    api = Replica()
    assert_named_answer(api.post_json(body), api)


FORM_TEXT = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters='\r\n"\\'), max_size=10)


@FUZZ
@given(fields=st.lists(st.tuples(FIELD_NAMES, FORM_TEXT | st.sampled_from(["3", "64", "-1", "[1]", "{}"])), max_size=3))
def test_fuzz_multipart_fields_give_a_result_or_a_named_400(fields):
    api = Replica()
    assert_named_answer(api.post_form([*FIELDS.items(), *fields], [("images", PHOTO)]), api)


def test_proxy_middleware_stops_reading_at_the_limit():
    from qie.serving.body_limit import BodyLimit

    seen: dict = {}

    async def app(scope, receive, send):  # reads the whole body, as Serve's proxy forwards it
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                seen["disconnected"] = True
                return
            total += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await Response(b"ok")(scope, receive, send)

    async def run(headers, count):
        pulled, sent = [0], []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/", "headers": headers, "query_string": b""}
        await BodyLimit(app, limit=4 * 2**20)(scope, chunked(b"x" * 2**20, count, pulled), send)
        return pulled[0], sent

    pulled, sent = asyncio.run(run([(b"transfer-encoding", b"chunked")], 300))
    assert pulled <= 5 and seen["disconnected"], pulled
    assert sent[0]["status"] == 400 and json.loads(sent[1]["body"])["param"] == "body"
    pulled, sent = asyncio.run(run([(b"content-length", str(300 * 2**20).encode())], 300))
    assert pulled == 0 and sent[0]["status"] == 400
    pulled, sent = asyncio.run(run([(b"transfer-encoding", b"chunked")], 3))
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"ok"
