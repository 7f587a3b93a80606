"""The prompt / condition cache (qie/core/encode_cache.py)."""

import dataclasses
import threading

import numpy as np
import pytest
import torch
from conftest import small_request

from qie import Editor
from qie.core.encode_cache import EditCache, LRUCache, tensor_bytes
from qie.core.stages import PromptEmbeds


@pytest.fixture()
def fresh_editor(tiny_editor):
    """An editor on the shared tiny pipeline with an empty cache of its own."""
    return Editor(
        tiny_editor.pipe, model="tiny", device=tiny_editor.device, dtype=tiny_editor.dtype, plan=tiny_editor.plan
    )


def test_new_seed_and_steps_hit_both_caches_and_match_an_uncached_run(fresh_editor, tiny_editor, photo):
    first = fresh_editor.edit(small_request(photo, seed=1))
    assert first.notes == ()
    second = fresh_editor.edit(small_request(photo, seed=2, steps=2))
    assert second.notes == ("prompt cache hit", "condition cache hit")
    assert second.timings["text_encode"] < 0.5 * first.timings["text_encode"]
    assert second.timings["condition_encode"] < 0.5 * first.timings["condition_encode"]
    stats = fresh_editor.cache.stats()
    # CFG: prompt and negative prompt; each missed once, then hit once.
    assert stats["prompt"] | {"bytes": 0} == {"entries": 2, "bytes": 0, "hits": 2, "misses": 2}
    assert (stats["condition"]["hits"], stats["condition"]["misses"]) == (1, 1)

    fresh_editor.cache = EditCache(max_entries=0)  # off
    uncached = fresh_editor.edit(small_request(photo, seed=2, steps=2))
    assert uncached.notes == ()
    assert np.array_equal(np.asarray(uncached.image), np.asarray(second.image))


@pytest.mark.slow
def test_other_prompt_fixes_or_images_miss(fresh_editor, photo):
    fresh_editor.edit(small_request(photo, steps=2, true_cfg_scale=1.0))
    other_prompt = fresh_editor.edit(small_request(photo, steps=2, true_cfg_scale=1.0, prompt="make it blue"))
    assert other_prompt.notes == ("condition cache hit",)
    fresh_editor.fixes["mm_token_type_ids"] = False
    assert "prompt cache hit" not in fresh_editor.edit(small_request(photo, steps=2, true_cfg_scale=1.0)).notes
    other_image = photo.transpose(0)
    assert fresh_editor.edit(small_request(other_image, steps=2, true_cfg_scale=1.0)).notes == ()
    bigger = fresh_editor.edit(small_request(photo, steps=2, true_cfg_scale=1.0, max_side=160))
    assert bigger.notes == ("prompt cache hit",)  # the condition is encoded at the output's area


def test_a_new_pipeline_or_component_clears_the_cache():
    class Pipe:
        def __init__(self):
            self.text_encoder, self.vae = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)

    cache, pipe = EditCache(), Pipe()
    cache.bind(pipe)
    cache.prompts.put("k", 1, 4)
    cache.bind(pipe)
    assert len(cache.prompts) == 1
    pipe.vae = torch.nn.Linear(1, 1)
    cache.bind(pipe)
    assert len(cache.prompts) == 0


def test_lru_evicts_by_bytes_and_by_count():
    def embeds(tokens):
        return PromptEmbeds(embeds=torch.zeros(1, tokens, 32), mask=None)

    assert tensor_bytes(embeds(10)) == 10 * 32 * 4
    cache = LRUCache(max_entries=10, max_bytes=3 * 1280)
    for key in "abc":
        cache.put(key, embeds(10), tensor_bytes(embeds(10)))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", embeds(10), 1280)  # over the byte bound: b (least recently used) goes
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 3
    cache.put("huge", embeds(200), tensor_bytes(embeds(200)))  # larger than the cache: not stored
    assert cache.get("huge") is None and len(cache) == 3
    assert cache.stats()["bytes"] == 3 * 1280

    small = LRUCache(max_entries=2, max_bytes=10**9)
    for key in "xyz":
        small.put(key, key, 1)
    assert small.get("x") is None and small.get("z") == "z" and len(small) == 2


def test_lru_is_thread_safe():
    cache = LRUCache(max_entries=50, max_bytes=400)

    def work(offset):
        for i in range(2000):
            cache.put((offset + i) % 97, i, 7)
            cache.get((offset * 3 + i) % 97)

    threads = [threading.Thread(target=work, args=(k * 13,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = cache.stats()
    assert stats["hits"] + stats["misses"] == 4 * 2000
    assert stats["entries"] == len(cache) <= 50 and stats["bytes"] == 7 * stats["entries"] <= 400


def test_an_edit_hashes_each_input_image_once(fresh_editor, photo, monkeypatch):
    """Both stages' cache keys use the images' digests; hashing a 1024² image costs a few ms, so once per edit."""
    from qie.core import encode_cache

    hashed = []
    real = encode_cache.image_digest
    monkeypatch.setattr(encode_cache, "image_digest", lambda image: hashed.append(image.size) or real(image))
    second = photo.resize((64, 48))
    request = small_request(photo, seed=2, true_cfg_scale=2.0, negative_prompt="blur")
    result = fresh_editor.edit(dataclasses.replace(request, images=[photo, second]))
    assert sorted(hashed) == sorted([photo.size, second.size])
    assert result.notes == ()  # nothing cached yet: both stages encoded
