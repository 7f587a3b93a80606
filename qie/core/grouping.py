"""Which requests can share one denoising batch: one key function, and grouping by it.

Requests share a batch when every field of `EditRequest` not marked `PER_SAMPLE` is equal
(output size, steps, condition area, speed options, ...), their effective CFG is the same, and
their input images give the same condition token grids. Per-sample fields (images, prompts, seed,
tiling, mask or box, resize) may differ: the editor applies them image by image. A new request
field is shared unless marked otherwise, so it can never be silently mixed within a batch.

Example:
    >>> from PIL import Image
    >>> from qie.core.request import EditRequest
    >>> a = EditRequest(images=[Image.new("RGB", (64, 48))], prompt="a", seed=1, max_side=128)
    >>> b = EditRequest(images=[Image.new("RGB", (64, 48))], prompt="b", seed=2, max_side=128)
    >>> batch_key(a) == batch_key(b), group_by_key([a, b, a], max_batch=2)
    (True, [[0, 1], [2]])
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import fields

from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import VAE_IMAGE_SIZE, calculate_dimensions

from qie.core.request import EditRequest
from qie.errors import InvalidRequestError


def condition_area(request: EditRequest) -> int:
    """The pixel area the request's input images are VAE-encoded at."""
    return request.width * request.height if request.condition_area_used == "output" else VAE_IMAGE_SIZE


def shared_fields() -> tuple[str, ...]:
    """The `EditRequest` fields that must be equal within one batch (those not marked `PER_SAMPLE`)."""
    return tuple(f.name for f in fields(EditRequest) if not f.metadata.get("per_sample"))


def batch_key(request: EditRequest) -> Hashable:
    """What must match for two requests to share a denoising batch (cheap: no model work)."""
    area = condition_area(request)
    grids = tuple(calculate_dimensions(area, img.width / img.height) for img in request.images)
    shared = tuple((name, getattr(request, name)) for name in shared_fields())
    return (*shared, ("cfg", request.true_cfg_scale if request.uses_cfg else None), ("grids", grids))


def check_batchable(requests: Sequence[EditRequest]) -> None:
    """Raise `InvalidRequestError` unless all `requests` share one `batch_key`, naming what differs."""
    keys = [batch_key(r) for r in requests]
    for i, key in enumerate(keys[1:], start=1):
        if key != keys[0]:
            differ = [name for (name, a), (_, b) in zip(keys[0], key, strict=True) if a != b]
            raise InvalidRequestError(
                f"requests[{i}]",
                f"<{', '.join(differ)} differ from requests[0]>",
                "batch only requests with the same batch_key(); qie.core.grouping.group_by_key groups them",
            )


def group_by_key(requests: Sequence[EditRequest], max_batch: int) -> list[list[int]]:
    """Indices of `requests` grouped into batches of at most `max_batch` with equal `batch_key`, in order."""
    groups: dict[Hashable, list[list[int]]] = {}
    for i, request in enumerate(requests):
        chunks = groups.setdefault(batch_key(request), [[]])
        if len(chunks[-1]) >= max_batch:
            chunks.append([])
        chunks[-1].append(i)
    return [chunk for chunks in groups.values() for chunk in chunks]
