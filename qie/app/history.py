"""Session history: this browser tab's results (never another visitor's), to look back and restore.

The history lives in a `gr.State`, which Gradio keeps per browser session; entries hold the result
PNG, the first input image (a file Gradio already holds) and the settings that made it.

Example:
    >>> entries = record([], [{"png": "/tmp/a.png", "seed": 1, "stats": "..."}], "/tmp/in.png", {"prompt": "x"})
    >>> [e["settings"]["seed"] for e in entries]
    [1]
"""

from __future__ import annotations

MAX_ENTRIES = 24  # newest first; older ones drop off
# The controls an entry restores (besides the image and the seed).
SETTINGS = (
    "prompt",
    "negative_prompt",
    "steps",
    "true_cfg_scale",
    "max_side",
    "resize_to_input",
    "condition_area",
    "aspect",
)


def record(history: list[dict] | None, outputs: list[dict] | None, image: str | None, settings: dict) -> list[dict]:
    """`history` with this edit's outputs added in front (once: an edit already recorded is skipped)."""
    history = list(history or [])
    known = {entry["png"] for entry in history}
    fresh = [
        {
            "png": out["png"],
            "stats": out["stats"],
            "input": image,
            "settings": {**{k: settings.get(k) for k in SETTINGS}, "seed": out["seed"]},
        }
        for out in outputs or []
        if out["png"] not in known
    ]
    return (fresh + history)[:MAX_ENTRIES]


def thumbnails(history: list[dict]) -> list[tuple[str, str]]:
    """The gallery's items: each result with its instruction as caption."""
    return [(entry["png"], _caption(entry["settings"].get("prompt") or "")) for entry in history]


def _caption(prompt: str, limit: int = 40) -> str:
    return prompt if len(prompt) <= limit else prompt[: limit - 1] + "…"
