"""A cache of finished edits: the same images, prompt, parameters and model give the stored PNG back.

The key hashes the input pixels, every parameter of the request (`EditRequest.parameters()`
plus `resize_to_input`), the model id and its revision. A request without a seed gets a random
one, so it never hits: that is the meaning of "random". Two backends:

- `DiskCache` (the default, embedded): a folder of `<key>.png` + `<key>.json`, bounded in bytes,
  least recently used entries removed first. Safe for several processes on one machine.
- `RedisCache` (shared by many replicas and machines): `--cache redis://host:port/db`. Entries
  expire after `ttl_s`; bound its memory on the server (`maxmemory` + `allkeys-lru`).

What is stored: the result PNG as it was served (its text chunks hold the edit's metadata,
prompt included) and a small record: the entry's SHA-256 (disk) or HMAC-SHA256 under the
deployment's secret (Redis), and the seed, timings and batch size the HTTP headers report.
Nothing else about the request is kept; the input images are only in the key, as a hash.

Every hit is verified before it is served: a PNG or record that was replaced, truncated or
garbled is dropped and logged at WARNING, and the request is edited as a miss.

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
import hmac
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from qie.core.images import image_digest  # pixels: the same picture in another file format matches
from qie.errors import InvalidRequestError
from qie.settings import read as read_setting
from qie.versions import __version__

log = logging.getLogger(__name__)

DEFAULT_DISK_BYTES = 2 * 2**30
DEFAULT_TTL_S = 7 * 24 * 3600
KEY_VERSION = "4"  # bump when the meaning of a key changes (2: no `options` mapping; 3: `image_digest` of qie.core;
# 4: that digest in SHA-256)
CACHE_URL_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclass(frozen=True)
class CachedEdit:
    """A stored result: the output PNG and its metadata (seed, size, timings of the original edit)."""

    png: bytes
    meta: dict[str, Any]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
META_FIELDS = {"seed": int, "batch_size": int, "timings": dict}  # all a hit needs: the answer's headers


class BadEntry(ValueError):
    """A stored entry failed verification (the reason is the message)."""


def entry_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The part of an edit's metadata a cache entry keeps (`META_FIELDS`; the rest is in the PNG).

    Example:
        >>> entry_meta({"prompt": "secret plan", "seed": 3, "timings": {}, "batch_size": 1})
        {'seed': 3, 'timings': {}, 'batch_size': 1}
    """
    return {k: v for k, v in meta.items() if k in META_FIELDS}


def entry_digest(key: str, png: bytes, meta_json: bytes, secret: bytes | None = None) -> str:
    """SHA-256 (or, with `secret`, HMAC-SHA256) over the key, the PNG and the record's metadata."""
    parts = (key.encode(), hashlib.sha256(png).digest(), meta_json)
    message = b"\0".join(parts)
    if secret is None:
        return hashlib.sha256(message).hexdigest()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def verified(key: str, png: Any, meta_json: Any, digest: Any, secret: bytes | None = None) -> CachedEdit:
    """The entry when its digest matches and its parts are well formed; else `BadEntry`."""
    if not isinstance(png, bytes) or not png.startswith(PNG_SIGNATURE):
        raise BadEntry("the image is not a PNG")
    if not isinstance(meta_json, bytes) or not isinstance(digest, (str, bytes)):
        raise BadEntry("the record is incomplete")
    digest = digest.decode("ascii", "replace") if isinstance(digest, bytes) else digest
    if not hmac.compare_digest(digest, entry_digest(key, png, meta_json, secret)):
        raise BadEntry("the digest does not match (altered, or written under another secret)")
    try:
        meta = json.loads(meta_json)
    except ValueError as exc:
        raise BadEntry("the record is not JSON") from exc
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in META_FIELDS.items()):
        raise BadEntry(f"the record lacks {sorted(META_FIELDS)}")
    return CachedEdit(png=png, meta=meta)


def _drop_warning(backend: str, key: str, exc: BadEntry) -> None:
    log.warning("%s result cache: entry %s failed verification (%s); dropped", backend, key[:16], exc)


class ResultCache(Protocol):
    """What a backend provides."""

    name: str

    def get(self, key: str) -> CachedEdit | None: ...

    def put(self, key: str, png: bytes, meta: dict[str, Any]) -> None: ...


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
        png, record = self.root / f"{key}.png", self.root / f"{key}.json"
        try:
            data, record_bytes = png.read_bytes(), record.read_bytes()
        except OSError:
            return None
        try:
            fields = json.loads(record_bytes)
            if not isinstance(fields, dict):
                raise BadEntry("the record is not a JSON object")
            entry = verified(key, data, _canonical(fields.get("meta")), fields.get("sha256"))
        except (BadEntry, ValueError) as exc:
            _drop_warning("disk", key, exc if isinstance(exc, BadEntry) else BadEntry(f"unreadable record: {exc}"))
            self._remove(key)
            return None
        with contextlib.suppress(OSError):
            os.utime(png)  # mark as recently used
        return entry

    def put(self, key: str, png: bytes, meta: dict[str, Any]) -> None:
        meta_json = _canonical(entry_meta(meta))
        record = {"sha256": entry_digest(key, png, meta_json), "meta": json.loads(meta_json)}
        tag = f".{os.getpid()}.{threading.get_ident()}.partial"
        with self._lock:
            for suffix, data in ((".json", json.dumps(record).encode()), (".png", png)):
                target = self.root / f"{key}{suffix}"
                partial = target.with_name(target.name + tag)
                try:
                    partial.write_bytes(data)
                    partial.replace(target)  # readers never see half a file; the PNG lands last
                except OSError as exc:
                    partial.unlink(missing_ok=True)
                    log.warning("disk result cache: cannot store %s (%s); the result is not cached", key[:16], exc)
                    return
            self._evict()

    def _remove(self, key: str) -> None:
        for suffix in (".png", ".json"):
            with contextlib.suppress(OSError):
                (self.root / f"{key}{suffix}").unlink(missing_ok=True)

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
    """Entries in Redis as hashes `{png, meta, mac}` under `qie:result:<key>`, expiring after `ttl_s`.

    `mac` is an HMAC-SHA256 under `secret`, which every replica of one deployment shares: an
    entry that another party wrote or altered in Redis is never served.
    """

    name = "redis"

    def __init__(self, url: str, secret: bytes, ttl_s: int = DEFAULT_TTL_S, timeout_s: float = 2.0) -> None:
        import redis

        if len(secret) < 16:
            raise InvalidRequestError("cache_secret", "<secret>", "give at least 16 bytes (e.g. 32 random hex digits)")
        self.url = url
        self.secret = secret
        self.ttl_s = ttl_s
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.client.ping()  # fail now, not on the first edit

    def get(self, key: str) -> CachedEdit | None:
        import redis

        name = f"qie:result:{key}"
        try:
            png, meta, mac = self.client.hmget(name, ["png", "meta", "mac"])
            if png is None and meta is None and mac is None:
                return None
            try:
                return verified(key, png, meta, mac, self.secret)
            except BadEntry as exc:
                _drop_warning("Redis", key, exc)
                self.client.delete(name)
                return None
        except redis.RedisError as exc:
            log.warning("Redis cache %s failed on get (%s); treating it as a miss", _safe_url(self.url), exc)
            return None

    def put(self, key: str, png: bytes, meta: dict[str, Any]) -> None:
        import redis

        name = f"qie:result:{key}"
        meta_json = _canonical(entry_meta(meta))
        mac = entry_digest(key, png, meta_json, self.secret)
        try:
            with self.client.pipeline() as pipe:
                pipe.hset(name, mapping={"png": png, "meta": meta_json, "mac": mac})
                pipe.expire(name, self.ttl_s)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("Redis cache %s failed on put (%s); the result is not cached", _safe_url(self.url), exc)


def _canonical(meta: Any) -> bytes:
    """One byte form for a record's metadata, the same when written and when checked."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), default=str).encode()


def _safe_url(url: str) -> str:
    """`url` with any password masked (redis://:pw@host -> redis://:***@host)."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


def default_disk_root() -> Path:
    """`$QIE_RESULT_CACHE`, or `results-<version>` under `$QIE_CACHE` (default ~/.cache/qie)."""
    return read_setting("result_cache_dir") or read_setting("cache_dir") / f"results-{__version__}"


def open_cache(
    spec: str | None = "disk",
    *,
    root: str | os.PathLike | None = None,
    max_bytes: int = DEFAULT_DISK_BYTES,
    secret: bytes | None = None,
) -> ResultCache | None:
    """The cache named by `spec`: "disk" (default), "off"/None (no cache), or a `redis://` / `rediss://` URL.

    Redis needs `secret`, the deployment's key for its entries' HMACs. An unreachable Redis falls
    back to the disk cache, with a WARNING.
    """
    if spec in (None, "", "off", "none"):
        return None
    if spec == "disk":
        return DiskCache(root or default_disk_root(), max_bytes)
    if spec.startswith(CACHE_URL_SCHEMES):
        shown = _safe_url(spec)
        if secret is None:
            raise InvalidRequestError(
                "cache_secret", None, "a Redis cache needs the deployment's secret (QIE_CACHE_SECRET)"
            )
        try:
            import redis
        except ImportError:
            log.warning("--cache %s needs the redis client (pip install 'qie[serve]'); using the disk cache", shown)
            return DiskCache(root or default_disk_root(), max_bytes)
        try:
            return RedisCache(spec, secret)
        except redis.RedisError as exc:
            log.warning("Redis at %s is unreachable (%s); using the disk cache instead", shown, exc)
            return DiskCache(root or default_disk_root(), max_bytes)
    raise InvalidRequestError("cache", spec, "use 'disk', 'off' or a redis://host:port/db URL")
