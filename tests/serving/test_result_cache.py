"""The result cache: keys, the disk backend and a real redis-server."""

import logging
import time

import pytest
from conftest import small_request
from redis_server import free_port

from qie import InvalidRequestError
from qie.serving.result_cache import DiskCache, RedisCache, cache_key, open_cache


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


def test_disk_cache_round_trip_and_size_bound(tmp_path):
    cache = DiskCache(tmp_path, max_bytes=2500)
    assert cache.get("a") is None
    for name in "abc":
        cache.put(name, bytes(1000), {"seed": name})
        time.sleep(0.02)  # distinct modification times (the LRU order)
    assert cache.get("a") is None  # the oldest went to stay under 2500 bytes
    entry = cache.get("c")
    assert entry.png == bytes(1000) and entry.meta == {"seed": "c"}
    assert not list(tmp_path.glob("*.partial"))


def test_redis_cache_round_trip(redis_url):
    cache = open_cache(redis_url)
    assert isinstance(cache, RedisCache)
    assert cache.get("k") is None
    cache.put("k", b"\x89PNG...", {"seed": 4})
    entry = open_cache(redis_url).get("k")  # another client sees it
    assert entry.png == b"\x89PNG..." and entry.meta == {"seed": 4}
    assert 0 < cache.client.ttl("qie:result:k") <= cache.ttl_s


def test_unreachable_redis_falls_back_to_disk_with_warning(tmp_path, caplog):
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="qie.serving.result_cache"):
        cache = open_cache(url, root=tmp_path)
    assert isinstance(cache, DiskCache) and cache.root == tmp_path
    assert "unreachable" in caplog.text and url in caplog.text


def test_cache_spec_validation(tmp_path):
    assert open_cache("off") is None
    assert isinstance(open_cache("disk", root=tmp_path), DiskCache)
    with pytest.raises(InvalidRequestError, match="cache='memcached://x' is not valid"):
        open_cache("memcached://x")
