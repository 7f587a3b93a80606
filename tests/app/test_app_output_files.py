"""What the page's before/after view is given: files of their own, never PIL images.

Gradio writes a PIL output to a file named by its content, in place (`save_pil_to_cache`), so two
requests showing the same image at once rewrote that file while a client was downloading it, and
the download came back empty ("peer closed connection without sending complete message body",
seen with 20 concurrent clients editing the same example photo). File outputs are copied into
Gradio's cache atomically under their own names.
"""

from __future__ import annotations

from pathlib import Path

from conftest import EXAMPLES
from PIL import Image

import qie
from qie.app.handlers import run_edits


def test_before_and_after_are_files_of_their_own(tiny_editor):
    request = qie.EditRequest(images=[EXAMPLES / "coffee-cup.jpg"], prompt="white background", steps=2, max_side=128)
    runs = [run_edits(tiny_editor, [request], None, lambda step, total: None, None)[0] for _ in range(2)]
    for out in runs:
        for key in ("before", "after"):
            assert isinstance(out[key], str) and Path(out[key]).is_file(), key
        assert out["after"] == out["png"]
        with Image.open(out["before"]) as before, Image.open(out["after"]) as after:
            assert before.size == after.size
    assert runs[0]["before"] != runs[1]["before"]  # the same input shown twice: two files
