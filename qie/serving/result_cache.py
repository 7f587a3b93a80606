"""A cache of finished edits: the same images, prompt, parameters and model give the stored PNG back.

The key hashes the input pixels, every parameter of the request (`EditRequest.parameters()`
plus `resize_to_input`), the model id and its revision. A request without a seed gets a random
one, so it never hits: that is the meaning of "random". Two backends:

- `DiskCache` (the default, embedded): a folder of `<key>.png` + `<key>.json`, bounded in bytes,
  least recently used entries removed first. Safe for several processes on one machine.
- `RedisCache` (shared by many replicas and machines): `--cache redis://host:port/db`. Entries
  expire after `ttl_s`; bound its memory on the server (`maxmemory` + `allkeys-lru`).

`open_cache(spec)` picks one; when Redis cannot be reached it logs a WARNING and uses the disk.
A backend error during `get`/`put` is logged and treated as a miss: the cache never fails an edit.

Example:
    >>> cache = open_cache("disk", root="/tmp/qie-results")                     # doctest: +SKIP
    >>> key = cache_key(request, model="Qwen/Qwen-Image-Edit-2509", revision=None)  # doctest: +SKIP
    >>> cache.get(key) or cache.put(key, png_bytes, {"seed": 1})                # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from qie.errors import InvalidRequestError
from qie.settings import read as read_setting
from qie.versions import __version__

log = logging.getLogger(__name__)

DEFAULT_DISK_BYTES = 2 * 2**30
DEFAULT_TTL_S = 7 * 24 * 3600
KEY_VERSION = "2"  # bump when the meaning of a key changes (2: no `options` mapping)
CACHE_URL_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclass(frozen=True)
class CachedEdit:
    """A stored result: the output PNG and its metadata (seed, size, timings of the original edit)."""

    png: bytes
    meta: dict[str, Any]


class ResultCache(Protocol):
    """What a backend provides."""

    name: str

    def get(self, key: str) -> CachedEdit | None: ...

    def put(self, key: str, png: bytes, meta: dict[str, Any]) -> None: ...


def image_digest(image: Any) -> str:
    """SHA-256 of a normalized RGB image's size and pixels (the same picture in another file format matches)."""
    h = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def cache_key(request: Any, *, model: str, revision: str | None) -> str:
    """The key of `request` (an `EditRequest`) on `model` at `revision`.

    Example:
        >>> from PIL import Image
        >>> from qie import EditRequest
        >>> r = EditRequest(images=[Image.new("RGB", (64, 64))], prompt="white background", seed=3)
        >>> cache_key(r, model="tiny", revision=None) == cache_key(r, model="tiny", revision="v2")
        False
    """
    payload = {
        "v": KEY_VERSION,
        "images": [image_digest(img) for img in request.images],
        "parameters": request.parameters(),
        "resize_to_input": request.resize_to_input,
        "model": model,
        "revision": revision,
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class DiskCache:
    """A folder of PNG + JSON pairs, at most `max_bytes` in all (least recently used removed first)."""

    name = "disk"

    def __init__(self, root: str | os.PathLike, max_bytes: int = DEFAULT_DISK_BYTES) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def get(self, key: str) -> CachedEdit | None:
        png, meta = self.root / f"{key}.png", self.root / f"{key}.json"
        try:
            entry = CachedEdit(png=png.read_bytes(), meta=json.loads(meta.read_text()))
        except (OSError, ValueError):
            return None
        with contextlib.suppress(OSError):
            os.utime(png)  # mark as recently used
        return entry

    def put(self, key: str, png: bytes, meta: dict[str, Any]) -> None:
        tag = f".{os.getpid()}.{threading.get_ident()}.partial"
        with self._lock:
            for suffix, data in ((".json", json.dumps(meta, default=str).encode()), (".png", png)):
                target = self.root / f"{key}{suffix}"
                partial = target.with_name(target.name + tag)
                partial.write_bytes(data)
                partial.replace(target)  # readers never see half a file; the PNG lands last
            self._evict()

    def _evict(self) -> None:
        entries = []
        for png in self.root.glob("*.png"):
            try:
                stat = png.stat()
                size = stat.st_size + (
                    png.with_suffix(".json").stat().st_size if png.with_suffix(".json").exists() else 0
                )
            except OSError:
                continue
            entries.append((stat.st_mtime, size, png))
        total = sum(size for _, size, _ in entries)
        for _, size, png in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            png.unlink(missing_ok=True)
            png.with_suffix(".json").unlink(missing_ok=True)
            total -= size


class RedisCache:
    """Entries in Redis as hashes `{png, meta}` under `qie:result:<key>`, expiring after `ttl_s`."""

    name = "redis"

    def __init__(self, url: str, ttl_s: int = DEFAULT_TTL_S, timeout_s: float = 2.0) -> None:
        import redis

        self.url = url
        self.ttl_s = ttl_s
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.client.ping()  # fail now, not on the first edit

    def get(self, key: str) -> CachedEdit | None:
        import redis

        try:
            png, meta = self.client.hmget(f"qie:result:{key}", ["png", "meta"])
        except redis.RedisError as exc:
            log.warning("Redis cache %s failed on get (%s); treating it as a miss", self.url, exc)
            return None
        if png is None or meta is None:
            return None
        return CachedEdit(png=png, meta=json.loads(meta))

    def put(self, key: str, png: bytes, meta: dict[str, Any]) -> None:
        import redis

        name = f"qie:result:{key}"
        try:
            with self.client.pipeline() as pipe:
                pipe.hset(name, mapping={"png": png, "meta": json.dumps(meta, default=str)})
                pipe.expire(name, self.ttl_s)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("Redis cache %s failed on put (%s); the result is not cached", self.url, exc)


def default_disk_root() -> Path:
    """`$QIE_RESULT_CACHE`, or `results-<version>` under `$QIE_CACHE` (default ~/.cache/qie)."""
    return read_setting("result_cache_dir") or read_setting("cache_dir") / f"results-{__version__}"


def open_cache(
    spec: str | None = "disk", *, root: str | os.PathLike | None = None, max_bytes: int = DEFAULT_DISK_BYTES
) -> ResultCache | None:
    """The cache named by `spec`: "disk" (default), "off"/None (no cache), or a `redis://` / `rediss://` URL.

    An unreachable Redis falls back to the disk cache, with a WARNING.
    """
    if spec in (None, "", "off", "none"):
        return None
    if spec == "disk":
        return DiskCache(root or default_disk_root(), max_bytes)
    if spec.startswith(CACHE_URL_SCHEMES):
        try:
            import redis
        except ImportError:
            log.warning("--cache %s needs the redis client (pip install 'qie[serve]'); using the disk cache", spec)
            return DiskCache(root or default_disk_root(), max_bytes)
        try:
            return RedisCache(spec)
        except redis.RedisError as exc:
            log.warning("Redis at %s is unreachable (%s); using the disk cache instead", spec, exc)
            return DiskCache(root or default_disk_root(), max_bytes)
    raise InvalidRequestError("cache", spec, "use 'disk', 'off' or a redis://host:port/db URL")
