"""An HTTP edit service on Ray Serve: one replica per GPU, each holding one `qie.Editor`.

Start it with `python -m qie serve --model ... [--cache redis://host:6379/0]`, or with Ray's
own CLI: `serve run qie.serving.service:app` (settings from `QIE_*` environment variables, see
`ServeSettings.from_env`) or `serve run qie.serving.service:build_app model=tiny cache=off`.

    POST /   JSON {"images": ["<base64>", ...], "prompt": "...", "steps": 40, "seed": 1, ...}
             or multipart/form-data with one or more `images` files and the same fields
    ->  200 image/png (edit parameters inside as PNG text chunks), headers X-Qie-Seed,
        X-Qie-Cache (hit/miss/off), X-Qie-Batch-Size, X-Qie-Replica, X-Qie-Timings
    ->  400 / 503 / 507 / 500 JSON {"error", "message", "param", "value"}
    GET /    JSON: model, revision, plan, device, batching and cache settings

The fields are `EditRequest`'s and validated by it, so errors read as the library's. Requests
that wait together in a replica's queue (up to `max_batch_size`, for `batch_wait_timeout_s`) and
share output size, steps, CFG and condition shapes are denoised as one batch
(`qie.serving.batching`). A result cache (`qie.serving.result_cache`; disk by default, Redis shared across
replicas) answers repeats without touching the GPU.

Example:
    >>> import base64, requests                                                      # doctest: +SKIP
    >>> body = {"images": [base64.b64encode(open("shoe.jpg", "rb").read()).decode()],
    ...         "prompt": "pure white background", "seed": 1}                         # doctest: +SKIP
    >>> png = requests.post("http://127.0.0.1:8000/", json=body).content              # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import json
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from qie.core.images import png_bytes
from qie.core.load_options import LoadOptions
from qie.core.metadata import png_metadata
from qie.core.request import MAX_IMAGES, EditRequest
from qie.errors import BusyError, InvalidRequestError, QieError, ResourceError
from qie.serving.batching import run_grouped
from qie.serving.body_limit import MAX_BODY_BYTES, PROXY_CALLBACK
from qie.serving.result_cache import CACHE_URL_SCHEMES, cache_key, entry_meta, open_cache
from qie.settings import Settings
from qie.telemetry import RequestRecord, error_fields
from qie.versions import __version__

log = logging.getLogger(__name__)

UNHEALTHY_AFTER_FAILURES = 3  # consecutive internal errors before Serve restarts the replica
MAX_FORM_FIELDS = 64  # EditRequest has ~30 fields; Starlette's own default is 1,000
REQUEST_FIELDS = tuple(f.name for f in fields(EditRequest))
# Accepted and passed on, so that `EditRequest` answers with its own message (e.g. `options`: which typed fields).
_REQUEST_PARAMETERS = frozenset(inspect.signature(EditRequest).parameters)
MASK_FIX = "send the mask image itself: base64 in JSON, a file part in multipart (white where the edit goes)"
_INTS = ("steps", "seed", "height", "width", "max_side", "area")


@dataclass(frozen=True)
class ServeSettings:
    """How the service is deployed: how each replica loads its editor (`load`), batching, cache and
    replicas. `replicas=None` means one per GPU (one on a CPU-only machine).

    With `autoscale`, Serve keeps between `min_replicas` and `max_replicas` (default: the GPU
    count) replicas, aiming at `target_ongoing_requests` requests in flight per replica.
    """

    load: LoadOptions = field(default_factory=LoadOptions)
    cache: str = "disk"
    max_batch_size: int = 2
    batch_wait_timeout_s: float = 0.05
    replicas: int | None = None
    autoscale: bool = False
    min_replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    max_ongoing_requests: int = 8
    max_queued_requests: int = 256  # beyond this the proxy answers 503 at once instead of queueing
    gpus_per_replica: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_replica: float = 1.0
    # Key of the Redis cache entries' HMACs (QIE_CACHE_SECRET); unset: a random one per deployment.
    cache_secret: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch_size <= 64:
            raise InvalidRequestError("max_batch_size", self.max_batch_size, "give a whole number from 1 to 64")
        if self.batch_wait_timeout_s < 0:
            raise InvalidRequestError("batch_wait_timeout_s", self.batch_wait_timeout_s, "give 0 or more seconds")
        if self.cache not in ("disk", "off", "none", "") and not self.cache.startswith(CACHE_URL_SCHEMES):
            raise InvalidRequestError("cache", self.cache, "use 'disk', 'off' or a redis://host:port/db URL")
        if self.replicas is not None and self.replicas < 1:
            raise InvalidRequestError("replicas", self.replicas, "give 1 or more (or leave it unset: one per GPU)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServeSettings:
        """Settings from `QIE_*` variables (read by `qie.settings`): the engine's (QIE_MODEL, QIE_PLAN, ...),
        and QIE_<FIELD> for the others (QIE_MAX_BATCH_SIZE, ...; the cache is QIE_RESULT_CACHE_URL)."""
        settings = Settings.from_env(env)
        return cls.from_dict(dict(settings.serve), load=LoadOptions.from_env(settings))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], load: LoadOptions | None = None) -> ServeSettings:
        """Settings from plain (possibly string) values, as `serve run ... key=value` passes them.

        `LoadOptions` names (model=tiny, plan=stream, ...) go into `load` (on top of `load`'s values).
        """
        engine = {f.name: f.type for f in fields(LoadOptions)}
        own = {f.name: f.type for f in fields(cls) if f.name != "load"}
        unknown = set(values) - set(engine) - set(own)
        if unknown:
            raise InvalidRequestError("settings", sorted(unknown), f"use names from {[*own, *engine]}")
        changes = {k: _convert(k, v, engine[k]) for k, v in values.items() if k in engine}
        base = load or LoadOptions()
        load = LoadOptions.build({**vars(base), **changes}) if changes else base
        return cls(load=load, **{k: _convert(k, v, own[k]) for k, v in values.items() if k in own})


def deployment_options(settings: ServeSettings, gpus_in_cluster: int) -> dict[str, Any]:
    """Ray Serve options for the edit deployment: replicas (or autoscaling) and resources per replica.

    Example:
        >>> deployment_options(ServeSettings(), gpus_in_cluster=4)["num_replicas"]
        4
    """
    gpus = settings.gpus_per_replica
    if gpus is None:
        gpus = 1 if gpus_in_cluster > 0 and settings.load.device != "cpu" else 0
    options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": gpus, "num_cpus": settings.cpus_per_replica},
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
    }
    per_gpu = max(1, int(gpus_in_cluster // gpus)) if gpus else 1
    if settings.autoscale:
        options["autoscaling_config"] = {
            "min_replicas": settings.min_replicas,
            "max_replicas": settings.max_replicas or per_gpu,
            "target_ongoing_requests": settings.target_ongoing_requests,
            "upscale_delay_s": 10,
            "downscale_delay_s": 300,  # loading the model takes minutes: do not scale down on a lull
        }
        options["num_replicas"] = "auto"
    else:
        options["num_replicas"] = settings.replicas or per_gpu
    return options


def error_status(exc: BaseException) -> int:
    """The HTTP status for an error: 400 bad request, 503 busy / no device, 507 out of memory, 500 else."""
    if isinstance(exc, InvalidRequestError):
        return 400
    if isinstance(exc, BusyError):
        return 503
    if isinstance(exc, ResourceError):
        return 507 if "memory" in str(exc).lower() else 503
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return 507
    return 500


def as_request_error(exc: BaseException) -> BaseException:
    """An error met while reading a request: qie's own as it is, anything else as a 400 on the body.

    Validation is meant to name every bad field; an error that escapes it is still the request's
    fault (the edit has not started), so it is logged for a fix and answered as a bad request.
    """
    if isinstance(exc, QieError):
        return exc
    log.warning("request could not be read (%s: %s)", type(exc).__name__, exc, exc_info=exc)
    return InvalidRequestError("body", f"<{type(exc).__name__}>", "the request could not be read; check its fields")


def error_response(exc: BaseException) -> JSONResponse:
    """A JSON error body that names the parameter and value when the error does."""
    status = error_status(exc)
    message = str(exc) if isinstance(exc, QieError) else f"internal error ({type(exc).__name__}: {exc})"
    body = {
        "error": type(exc).__name__,
        "message": message,
        "param": getattr(exc, "param", None),
        "value": None if getattr(exc, "value", None) is None else str(exc.value),
    }
    headers = {"Retry-After": "5"} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


def request_from_fields(values: dict[str, Any], images: list[bytes]) -> EditRequest:
    """An `EditRequest` from HTTP fields (JSON values or form strings) and the raw image files.

    `mask`, when present, is already bytes (see `parse_http`): never a path on the server.
    """
    unknown = set(values) - _REQUEST_PARAMETERS
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidRequestError(name, values[name], f"unknown field; use one of {list(REQUEST_FIELDS)}")
    if isinstance(values.get("mask"), str):
        raise InvalidRequestError("mask", "<text>", MASK_FIX)
    params = {k: _convert(k, v, EditRequest.__dataclass_fields__[k].type) for k, v in values.items()}
    return EditRequest(images=images, **params)


async def read_body(http: Request, limit: int) -> bytes:
    """The request body, refused as soon as it passes `limit` bytes (chunked streams too)."""
    declared = http.headers.get("content-length")
    too_big = f"send at most {limit // 2**20} MiB"
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequestError("body", f"<Content-Length {declared[:20]}>", "send a valid Content-Length")
        if int(declared) > limit:
            raise InvalidRequestError("body", f"<{declared} bytes>", too_big)
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise InvalidRequestError("body", f"<more than {limit} bytes>", too_big)
        chunks.append(chunk)
    body = b"".join(chunks)
    http._body = body  # Starlette's form parser reads this instead of the spent stream
    return body


async def parse_http(http: Request) -> EditRequest:
    """Read a JSON or multipart body into a validated `EditRequest`.

    Images and the mask come only as request data: base64 strings in JSON, file parts (or base64
    text) in multipart.
    """
    body = await read_body(http, MAX_BODY_BYTES)
    if http.headers.get("content-type", "").startswith("multipart/form-data"):
        return await _parse_form(http)
    try:
        values = json.loads(body)
    except ValueError as exc:
        raise InvalidRequestError("body", "<not JSON>", "send JSON or multipart/form-data") from exc
    if not isinstance(values, dict):
        raise InvalidRequestError("body", type(values).__name__, "send a JSON object with 'images' and 'prompt'")
    encoded = values.pop("images", None)
    if isinstance(encoded, str):
        encoded = [encoded]
    if not isinstance(encoded, list) or not encoded:
        raise InvalidRequestError("images", encoded, "give a list of 1-3 base64-encoded images")
    if values.get("mask") is not None:
        values["mask"] = _b64("mask", values["mask"])
    return request_from_fields(values, [_b64(f"images[{i}]", item) for i, item in enumerate(encoded)])


async def _parse_form(http: Request) -> EditRequest:
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    try:
        form = await http.form(max_files=MAX_IMAGES + 1, max_fields=MAX_FORM_FIELDS)
    except (MultiPartException, HTTPException) as exc:
        why = getattr(exc, "message", None) or getattr(exc, "detail", "")
        raise InvalidRequestError(
            "body", "<multipart>", f"{why} (send at most {MAX_FORM_FIELDS} fields and {MAX_IMAGES + 1} files)"
        ) from exc
    images = [await _form_bytes(f"images[{i}]", item) for i, item in enumerate(form.getlist("images"))]
    values: dict[str, Any] = {k: v for k, v in form.multi_items() if k not in ("images", "mask")}
    if "mask" in form:
        values["mask"] = await _form_bytes("mask", form["mask"])
    return request_from_fields(values, images)


async def _form_bytes(name: str, item: Any) -> bytes:
    """A multipart file part's bytes, or a text part decoded from base64."""
    return await item.read() if hasattr(item, "read") else _b64(name, item)


@serve.deployment(
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_wait_loop_s=2,
    graceful_shutdown_timeout_s=120,  # let an edit in flight finish on scale-down or redeploy
)
class EditDeployment:
    """One replica: loads one `Editor`, answers HTTP, batches queued requests, uses the result cache."""

    def __init__(self, settings: ServeSettings) -> None:
        from qie.core.editor import Editor
        from qie.telemetry import add_secret, install_redaction

        self.settings = s = settings
        add_secret(s.cache_secret)
        install_redaction()  # the replica's own process: Ray's log handlers included
        _request_log_on()
        _replica_grpc_on_loopback()
        # The safety filter and fault drills follow the replica's own environment.
        here = Settings.from_env()
        self.editor = Editor.load(s.load, safety=here.safety, fault=here.fault)
        self.cache = open_cache(s.cache, secret=s.cache_secret.encode() if s.cache_secret else None)
        self._batched.set_max_batch_size(s.max_batch_size)
        self._batched.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        self.failures = 0
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a Serve replica (direct use in tests)
            self.replica = str(os.getpid())
        log.info("replica %s ready: %s, cache %s", self.replica, self.editor.model, getattr(self.cache, "name", "off"))

    async def __call__(self, http: Request) -> Response:
        if http.method == "GET":
            return JSONResponse(self.describe())
        record = RequestRecord({"channel": "serve", "replica": self.replica})
        try:
            request = await parse_http(http)
        except Exception as exc:  # malformed input never counts towards health
            return _logged(record, error_response(as_request_error(exc)), exc)
        try:
            return _logged(record, await self._answer(request))
        except Exception as exc:  # every failure becomes a JSON error response
            if error_status(exc) == 500:
                self.failures += 1
                log.exception("edit failed")
            return _logged(record, error_response(exc), exc)

    async def _answer(self, request: EditRequest) -> Response:
        key = cache_key(request, model=self.editor.weights_id, revision=self.editor.revision) if self.cache else None
        if key is not None:
            hit = await asyncio.to_thread(self.cache.get, key)
            if hit is not None:
                return self._png(hit.png, hit.meta, cache="hit")
        result = await self._batched(request)
        if isinstance(result, BaseException):
            raise result
        self.failures = 0
        meta = {
            **png_metadata(self.editor, request, result),
            "timings": dict(result.timings),
            "batch_size": _batch_size(result.notes),
        }
        png = png_bytes(result.image, meta)
        if key is not None:
            await asyncio.to_thread(self.cache.put, key, png, entry_meta(meta))
        return self._png(png, meta, cache="miss" if key else "off")

    def _png(self, png: bytes, meta: dict[str, Any], *, cache: str) -> Response:
        headers = {
            "X-Qie-Seed": str(meta.get("seed")),
            "X-Qie-Cache": cache,
            "X-Qie-Batch-Size": str(meta.get("batch_size", 1)),
            "X-Qie-Replica": self.replica,
            "X-Qie-Timings": json.dumps(meta.get("timings", {})),
        }
        return Response(png, media_type="image/png", headers=headers)

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=0.05)
    async def _batched(self, requests: list[EditRequest]) -> list[Any]:
        # The edit blocks; a thread keeps the replica's event loop free for health checks.
        return await asyncio.to_thread(run_grouped, self.editor, requests, self.settings.max_batch_size)

    def describe(self) -> dict[str, Any]:
        """What this replica runs (GET /)."""
        return {
            "qie": __version__,
            "model": self.editor.model,
            "revision": self.editor.revision,
            "plan": self.editor.plan.name,
            "device": str(self.editor.device),
            "replica": self.replica,
            "max_batch_size": self.settings.max_batch_size,
            "batch_wait_timeout_s": self.settings.batch_wait_timeout_s,
            "cache": getattr(self.cache, "name", "off"),
        }

    def check_health(self) -> None:
        """Called by Serve every `health_check_period_s`; raising makes Serve replace the replica."""
        if self.failures >= UNHEALTHY_AFTER_FAILURES:
            raise RuntimeError(f"{self.failures} edits in a row failed with internal errors")
        if self.editor.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.editor.device)  # raises when the device is lost

    def __del__(self) -> None:
        # Graceful shutdown: Serve drains requests first (graceful_shutdown_timeout_s), then this runs.
        editor = getattr(self, "editor", None)
        if editor is not None and editor.device.type == "cuda":
            import torch

            self.editor = None
            torch.cuda.empty_cache()


def build_app(args: dict[str, Any] | ServeSettings | None = None) -> serve.Application:
    """The Serve application for `args` (settings, or `serve run qie.serving.service:build_app key=value ...`)."""
    settings = args if isinstance(args, ServeSettings) else ServeSettings.from_dict(dict(args or {}))
    if settings.cache_secret is None and settings.cache.startswith(CACHE_URL_SCHEMES):
        # Replicas of this deployment share the key; entries do not outlive it (set QIE_CACHE_SECRET to keep them).
        settings = replace(settings, cache_secret=secrets.token_hex(32))
    options = deployment_options(settings, _cluster_gpus())
    log.debug("deployment of %s: %s", settings.load.model, options)
    return EditDeployment.options(**options).bind(settings)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def start_ray(host: str = "127.0.0.1") -> None:
    """Start a local Ray (or join `RAY_ADDRESS`) whose ports listen on loopback when `host` is loopback.

    Ray's gRPC servers, its metrics exporter and its agents otherwise listen on every interface,
    unauthenticated. Ray binds them to 127.0.0.1 when it runs as a single-machine cluster, which
    `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` selects (read here and by Ray's child processes).
    """
    import ray
    from ray._private import ray_constants

    joining = bool(os.environ.get("RAY_ADDRESS"))  # a running cluster binds as its operator set it up
    if not joining:  # Serve's proxy refuses an oversized body as it streams in (read by the proxy's process)
        os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)
    if host in LOOPBACK_HOSTS and not joining:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
    elif not joining:
        log.warning(
            "--host %s: Ray's own ports (GCS, raylet, workers, metrics) listen on every interface "
            "without authentication; let only the HTTP port through the firewall",
            host,
        )
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, ignore_reinit_error=True)


def _request_log_on() -> None:
    """Make sure the replica writes its per-request JSON lines (`qie.requests`, INFO) somewhere."""
    requests_log = logging.getLogger("qie.requests")
    requests_log.setLevel(logging.INFO)
    if not requests_log.hasHandlers():
        requests_log.addHandler(logging.StreamHandler())


def _replica_grpc_on_loopback() -> None:
    """In a loopback-only cluster (see `start_ray`), bind the replica's inter-deployment gRPC server,
    which Serve starts after this constructor on "[::]:0", to 127.0.0.1."""
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        return
    try:
        from ray.serve._private import replica
    except ImportError:
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "_qie_loopback", False):
        if original is None:
            log.warning("cannot bind this Ray version's replica gRPC port to loopback; it listens on every interface")
        return

    def on_loopback(server: Any, address: str) -> int:
        return original(server, address.replace("[::]", "127.0.0.1", 1))

    on_loopback._qie_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = on_loopback


def run_forever(settings: ServeSettings, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Start Ray (or join `RAY_ADDRESS`), deploy, and serve until SIGINT/SIGTERM; then drain and shut down.

    Draining deletes the application first: replicas finish the edits in flight (up to
    `graceful_shutdown_timeout_s`) and the proxy still delivers their responses; only then do
    Serve and Ray stop.
    """
    import signal
    import threading

    import ray

    # RAY_ADDRESS is Ray's own variable (join a running cluster), not a qie setting.
    start_ray(host)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(settings), name="qie", route_prefix="/")
        print(f"qie serve: http://{host}:{port}/ (model {settings.load.model}); Ctrl-C stops it", flush=True)
        while not stop.wait(1.0):
            pass
        log.info("stopping: finishing the edits in flight")
        serve.delete("qie", _blocking=True)
    finally:
        serve.shutdown()
        ray.shutdown()


def _cluster_gpus() -> int:
    import ray

    if ray.is_initialized():
        return int(ray.cluster_resources().get("GPU", 0))
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


OUTCOMES = {200: "ok", 400: "invalid", 503: "busy", 507: "out_of_memory"}


def _logged(record: RequestRecord, response: Response, exc: BaseException | None = None) -> Response:
    """Finish `record` (the request's one JSON log line) with the answer's status, and return the answer."""
    fields: dict[str, Any] = {"status": response.status_code}
    if "x-qie-cache" in response.headers:
        fields.update(cache=response.headers["x-qie-cache"], seed=response.headers.get("x-qie-seed"))
    if exc is not None:
        fields.update(error_fields(exc))
    record.finish(OUTCOMES.get(response.status_code, "failed"), **fields)
    return response


def _batch_size(notes: tuple[str, ...]) -> int:
    for note in notes:
        if note.startswith("batch of "):
            return int(note.removeprefix("batch of "))
    return 1


def _b64(name: str, item: Any) -> bytes:
    """Decode a base64 (or data URL) image field. A path is just text that is not base64: never opened."""
    fix = MASK_FIX if name == "mask" else "give the image file's bytes as a base64 string"
    if not isinstance(item, str):
        raise InvalidRequestError(name, type(item).__name__, fix)
    if item.startswith("data:") and "," in item:  # data URL
        item = item.split(",", 1)[1]
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequestError(name, item[:20] + "...", f"not valid base64; {fix}") from exc


def _convert(name: str, value: Any, kind: Any) -> Any:
    """Form and `key=value` fields arrive as strings: turn them into the field's type."""
    if not isinstance(value, str):
        return value
    kind = str(kind)
    try:
        if value == "" and "None" in kind:
            return None
        if kind.startswith("bool"):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("1", "true", "yes")
        if kind.startswith("int") or name in _INTS:
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith(("Mapping", "dict")):
            return json.loads(value)
        if kind.startswith("tuple"):
            return tuple(item.strip() for item in value.split(",") if item.strip())
    except ValueError as exc:
        raise InvalidRequestError(name, value, f"give a value of type {kind}") from exc
    return value


# `serve run qie.serving.service:app`: settings from QIE_* environment variables. Binding loads no model.
app = build_app(ServeSettings.from_env())
