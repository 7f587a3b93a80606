"""Prompt and condition caches: re-running an edit with a new seed or step count skips the encoders.

Two thread-safe LRU caches, bounded by entry count and bytes, with hit/miss counters:
- prompt embeddings (text encoder output), keyed by model, revision, which prompt (positive or
  negative), its text, the input images' digests, qie's prompt-encoding switches, device and dtype;
- condition latents (VAE encode of the inputs), keyed by model, revision, the images' digests,
  the encode area, device, dtype and the VAE tiling.

Tensors stay on the device they were made on. The cache belongs to one pipeline: `bind(pipe)`
clears it when the pipeline, its text encoder or its VAE is replaced. Call `clear()` after
changing weights in place.

Example:
    >>> cache = LRUCache(max_entries=2, max_bytes=1024)
    >>> cache.put("a", 1, nbytes=10); cache.get("a"), cache.get("b")
    (1, None)
    >>> cache.stats()
    {'entries': 1, 'bytes': 10, 'hits': 1, 'misses': 1}
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import torch
from PIL import Image

from qie.core import stages
from qie.core.images import image_digest
from qie.telemetry import step_range

T = TypeVar("T")

MIB = 2**20
DEFAULT_MAX_ENTRIES = 64
DEFAULT_MAX_BYTES = 256 * MIB  # per cache; a 1024² prompt embedding is ~2 MiB, a condition ~0.5 MiB


class LRUCache:
    """A thread-safe least-recently-used map bounded by `max_entries` and `max_bytes`.

    An entry larger than `max_bytes` is not stored. `max_entries=0` turns the cache off.
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        """The value for `key` (now the most recently used), or None; counts a hit or a miss."""
        with self._lock:
            if key not in self._entries:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key][0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        """Store `value` under `key`, evicting the least recently used entries to stay in bounds."""
        with self._lock:
            if key in self._entries:
                self._bytes -= self._entries.pop(key)[1]
            if self.max_entries <= 0 or nbytes > self.max_bytes:
                return
            self._entries[key] = (value, nbytes)
            self._bytes += nbytes
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                self._bytes -= self._entries.popitem(last=False)[1][1]

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        """Entries, bytes held, hits and misses."""
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._bytes, "hits": self.hits, "misses": self.misses}


class EditCache:
    """The prompt-embedding and condition-latent caches of one `Editor`.

    Example:
        >>> cache = EditCache(max_entries=32, max_bytes=64 * MIB)
        >>> sorted(cache.stats())
        ['condition', 'prompt']
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.prompts = LRUCache(max_entries, max_bytes)
        self.conditions = LRUCache(max_entries, max_bytes)
        self._owner: tuple[weakref.ref, ...] = ()
        self._lock = threading.Lock()

    def bind(self, pipe: Any) -> None:
        """Clear both caches unless they were filled by this `pipe` with this text encoder and VAE."""
        parts = (pipe, pipe.text_encoder, pipe.vae)
        with self._lock:
            if len(self._owner) == len(parts) and all(r() is p for r, p in zip(self._owner, parts, strict=True)):
                return
            self.clear()
            self._owner = tuple(weakref.ref(p) for p in parts)

    def clear(self) -> None:
        """Drop every cached tensor."""
        self.prompts.clear()
        self.conditions.clear()

    def stats(self) -> dict[str, dict[str, int]]:
        """`LRUCache.stats()` of each cache."""
        return {"prompt": self.prompts.stats(), "condition": self.conditions.stats()}


def tensor_bytes(value: Any) -> int:
    """Bytes held by the tensors in `value` (a tensor, a dataclass of tensors or a sequence of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(tensor_bytes(getattr(value, name)) for name in value.__dataclass_fields__)
    return 0


def cached(cache: LRUCache, key: Hashable, make: Callable[[], T]) -> tuple[T, bool]:
    """`cache[key]`, or `make()` stored under `key`; and whether it was a hit."""
    value = cache.get(key)
    if value is not None:
        return value, True
    value = make()
    cache.put(key, value, tensor_bytes(value))
    return value, False


def encode_prompts(
    cache: EditCache,
    pipe: Any,
    request: Any,
    *,
    model: str,
    revision: str | None,
    fixes: dict[str, bool],
    device: torch.device,
    uses_cfg: bool | None = None,
    digests: tuple[str, ...] | None = None,
    small: Callable[[], list[Image.Image]] | None = None,
) -> tuple[stages.PromptEmbeds, stages.PromptEmbeds | None, bool]:
    """The request's prompt (and, with CFG, negative prompt) embeddings, from the cache when there.

    `uses_cfg` overrides the request's own CFG setting (fast mode runs without CFG). `digests` are
    the images' `digests_of`, when the caller has them (hashing a 1024² image takes a few ms);
    `small` gives the images' `stages.prompt_images` when the caller started them early
    (`qie.core.image_prep`). Returns (prompt, negative or None, True when nothing had to be encoded).
    """
    digests = digests if digests is not None else digests_of(request.images)
    fix = fixes["mm_token_type_ids"]
    images: list[Image.Image] = []

    def encode(text: str) -> stages.PromptEmbeds:
        if not images:
            with step_range("prompt-images"):
                images.extend(small() if small is not None else stages.prompt_images(pipe, request.images))
        return stages.encode_prompt(pipe, text, images, device=device, forward_mm_token_type_ids=fix)

    base = (model, revision, digests, tuple(sorted(fixes.items())), str(device), str(pipe.text_encoder.dtype))
    prompt, hit = cached(cache.prompts, ("prompt", request.prompt, *base), lambda: encode(request.prompt))
    negative = None
    if request.uses_cfg if uses_cfg is None else uses_cfg:
        negative, neg_hit = cached(
            cache.prompts, ("negative", request.negative_prompt, *base), lambda: encode(request.negative_prompt)
        )
        hit = hit and neg_hit
    return prompt, negative, hit


def encode_condition(
    cache: EditCache,
    pipe: Any,
    request: Any,
    *,
    model: str,
    revision: str | None,
    area: int,
    device: torch.device,
    dtype: torch.dtype,
    digests: tuple[str, ...] | None = None,
) -> tuple[stages.Condition, bool]:
    """The request's condition latents at `area`, from the cache when there; and whether it was a hit.

    `digests` as for `encode_prompts`.
    """
    tiling = request.tiling
    tile_key = None if tiling is None else (tiling.size, tiling.overlap)
    digests = digests if digests is not None else digests_of(request.images)
    key = (model, revision, digests, area, str(device), str(dtype), tile_key)
    return cached(
        cache.conditions,
        key,
        lambda: stages.encode_condition(pipe, request.images, device=device, dtype=dtype, area=area, tile=tiling),
    )


def digests_of(images: Sequence[Image.Image]) -> tuple[str, ...]:
    """The `image_digest` of each image."""
    return tuple(image_digest(img) for img in images)
