"""Serving's batcher: queued requests grouped by `batch_key` and edited through `Editor.edit_batch`.

The editor runs one loop for one or many requests (`qie.core.editor.Editor.edit_batch`), so every
speed option, cache, observer and cancel applies to batched edits; this module only decides
which requests go together (`qie.core.grouping`) and isolates failures.

Example:
    >>> from qie import Editor
    >>> from qie.serving.batching import run_grouped
    >>> editor = Editor.load("tiny")                                    # doctest: +SKIP
    >>> results = run_grouped(editor, [request_a, request_b], max_batch=4)  # doctest: +SKIP
    >>> [r.notes[0] for r in results]                                   # doctest: +SKIP
    ['batch of 2', 'batch of 2']
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from qie.core.grouping import group_by_key
from qie.core.request import EditRequest, EditResult
from qie.errors import QieError

log = logging.getLogger(__name__)


def run_grouped(editor: Any, requests: Sequence[EditRequest], max_batch: int) -> list[EditResult | QieError]:
    """Edit `requests` in batches of equal `batch_key` (at most `max_batch` each); results in request order.

    Each group runs through `editor.edit_batch` (a group of one is an ordinary edit). A request
    that fails comes back as its `QieError` instead of a result. When a batch fails (a bad
    request, or out of GPU memory with no smaller plan left), its requests are retried one at a
    time (WARNING logged), so one bad request fails alone and a batch too big for the GPU still
    completes.

    Example:
        >>> results = run_grouped(editor, [request_a, request_b, request_c], max_batch=2)  # doctest: +SKIP
    """
    out: list[EditResult | QieError | None] = [None] * len(requests)
    singles: list[int] = []
    for group in group_by_key(requests, max_batch):
        try:
            for i, result in zip(group, editor.edit_batch([requests[i] for i in group]), strict=True):
                out[i] = result
            continue
        except QieError as exc:
            if len(group) == 1:
                out[group[0]] = exc
                continue
            log.warning("a batch of %d failed (%s); running its requests one at a time", len(group), exc)
        singles += group
    for i in sorted(singles):
        try:
            out[i] = editor.edit(requests[i])
        except QieError as exc:
            out[i] = exc
    return out  # type: ignore[return-value]
