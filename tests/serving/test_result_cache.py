"""The result cache: keys, the disk backend and a real redis-server."""

import json
import logging
import time

import pytest
from conftest import small_request
from redis_server import free_port

from qie import InvalidRequestError
from qie.serving.result_cache import PNG_SIGNATURE, DiskCache, RedisCache, cache_key, open_cache

SECRET = b"0123456789abcdef0123456789abcdef"


def test_key_covers_pixels_parameters_and_model(photo):
    base = small_request(photo)
    key = cache_key(base, model="tiny", revision=None)
    assert key == cache_key(small_request(photo.copy()), model="tiny", revision=None)
    others = [
        cache_key(small_request(photo.rotate(1)), model="tiny", revision=None),
        cache_key(small_request(photo, seed=2), model="tiny", revision=None),
        cache_key(small_request(photo, steps=4), model="tiny", revision=None),
        cache_key(small_request(photo, prompt="other"), model="tiny", revision=None),
        cache_key(small_request(photo, resize_to_input=True), model="tiny", revision=None),
        cache_key(base, model="other", revision=None),
        cache_key(base, model="tiny", revision="abc"),
    ]
    assert len({key, *others}) == 1 + len(others)


def png(fill: int = 0, size: int = 1000) -> bytes:
    """Bytes that start like a PNG (the caches check the signature, not the pixels)."""
    return PNG_SIGNATURE + bytes([fill]) * (size - len(PNG_SIGNATURE))


def meta(seed: int = 1, **extra) -> dict:
    return {"seed": seed, "timings": {"denoise": 0.5}, "batch_size": 1, **extra}


def test_disk_cache_round_trip_and_size_bound(tmp_path):
    cache = DiskCache(tmp_path, max_bytes=2700)
    assert cache.get("a") is None
    for seed, name in enumerate("abc"):
        cache.put(name, png(seed), meta(seed))
        time.sleep(0.02)  # distinct modification times (the LRU order)
    assert cache.get("a") is None  # the oldest went to stay under the bound
    entry = cache.get("c")
    assert entry.png == png(2) and entry.meta == meta(2)
    assert not list(tmp_path.glob("*.partial"))


def test_entries_keep_only_what_the_answer_needs(tmp_path, redis_url):
    disk, redis_cache = DiskCache(tmp_path), open_cache(redis_url, secret=SECRET)
    for cache in (disk, redis_cache):
        cache.put("small", png(), meta(prompt="my secret product launch", negative_prompt="x", model="tiny"))
        assert cache.get("small").meta == meta()
    assert b"secret product" not in (tmp_path / "small.json").read_bytes()
    assert b"secret product" not in redis_cache.client.hget("qie:result:small", "meta")


@pytest.mark.parametrize(
    "damage",
    [
        lambda root: (root / "k.png").write_bytes(png(7)),  # another image in its place
        lambda root: (root / "k.png").write_bytes(b""),  # emptied
        lambda root: (root / "k.png").write_bytes(b"garbage"),
        lambda root: (root / "k.json").write_text("{not json"),
        lambda root: (root / "k.json").write_text('["a list"]'),
        lambda root: (root / "k.json").write_text(json.dumps({"sha256": "0" * 64, "meta": meta(9)})),
    ],
)
def test_disk_cache_drops_and_logs_altered_entries(tmp_path, caplog, damage):
    cache = DiskCache(tmp_path)
    cache.put("k", png(), meta())
    damage(tmp_path)
    with caplog.at_level(logging.WARNING, logger="qie.serving.result_cache"):
        assert cache.get("k") is None
    assert "failed verification" in caplog.text
    assert not list(tmp_path.glob("k.*"))  # dropped, not refreshed
    assert cache.get("k") is None


@pytest.mark.parametrize(
    "fields",
    [
        {"png": png(7)},
        {"png": b""},
        {"meta": b"{not json"},
        {"meta": json.dumps(meta(9)).encode()},
        {"mac": "0" * 64},
        {"mac": b""},
    ],
)
def test_redis_cache_drops_and_logs_altered_entries(redis_url, caplog, fields):
    cache = open_cache(redis_url, secret=SECRET)
    cache.put("bad", png(), meta())
    cache.client.hset("qie:result:bad", mapping=fields)
    with caplog.at_level(logging.WARNING, logger="qie.serving.result_cache"):
        assert cache.get("bad") is None
    assert "failed verification" in caplog.text
    assert not cache.client.exists("qie:result:bad")


def test_redis_entries_need_the_deployment_secret(redis_url):
    cache = open_cache(redis_url, secret=SECRET)
    cache.put("s", png(), meta())
    assert open_cache(redis_url, secret=b"another-deployment-key").get("s") is None
    with pytest.raises(InvalidRequestError, match="cache_secret"):
        open_cache(redis_url)


def test_redis_cache_round_trip(redis_url):
    cache = open_cache(redis_url, secret=SECRET)
    assert isinstance(cache, RedisCache)
    assert cache.get("k") is None
    cache.put("k", png(4), meta(4))
    entry = open_cache(redis_url, secret=SECRET).get("k")  # another client (replica) sees it
    assert entry.png == png(4) and entry.meta == meta(4)
    assert 0 < cache.client.ttl("qie:result:k") <= cache.ttl_s


def test_unreachable_redis_falls_back_to_disk_with_warning(tmp_path, caplog):
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="qie.serving.result_cache"):
        cache = open_cache(url, root=tmp_path, secret=SECRET)
    assert isinstance(cache, DiskCache) and cache.root == tmp_path
    assert "unreachable" in caplog.text and url in caplog.text


def test_cache_spec_validation(tmp_path):
    assert open_cache("off") is None
    assert isinstance(open_cache("disk", root=tmp_path), DiskCache)
    with pytest.raises(InvalidRequestError, match="cache='memcached://x' is not valid"):
        open_cache("memcached://x")
