"""What every saved edit records about itself (PNG text chunks; CLI, app and serve all write it)."""

from __future__ import annotations

from typing import Any

from qie.core.request import EditRequest, EditResult
from qie.versions import __version__


def png_metadata(editor: Any, request: EditRequest, result: EditResult) -> dict[str, Any]:
    """The parameters saved in every output PNG."""
    return {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seed": result.seed,
        "steps": request.steps,
        "true_cfg_scale": request.true_cfg_scale,
        "size": f"{result.image.width}x{result.image.height}",
        "model": editor.model,
        "model_variant": editor.variant,
        "loras": ", ".join(lora.label for lora in editor.loras),
        "revision": editor.revision or "",
        "plan": result.plan,
        "qie_version": __version__,
    }
