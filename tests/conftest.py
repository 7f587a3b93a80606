"""Shared fixtures: one tiny pipeline per test session, built offline into a temporary cache."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def pytest_configure(config: pytest.Config) -> None:
    # Keep the tiny model cache inside the test session, never in the user's home.
    if "QIE_CACHE" not in os.environ:
        cache = Path(config.rootpath) / ".pytest_cache" / "qie"
        os.environ["QIE_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests run only when a `-m` expression names them (`-m gpu`), so `-m "not slow"` keeps them out too."""
    if "gpu" in (config.getoption("markexpr") or ""):
        return
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if item.get_closest_marker("gpu") is None]


@pytest.fixture(scope="session")
def tiny_editor():
    from qie import Editor

    return Editor.load("tiny")


@pytest.fixture(scope="session")
def tiny_2511_editor():
    """The tiny pipeline in the Edit-2511 flavour (`zero_cond_t=True`), same weights as `tiny_editor`'s."""
    from qie import Editor

    return Editor.load("tiny-2511")


@pytest.fixture(scope="session")
def tiny_dir(tiny_editor) -> Path:
    from qie.core.models import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture()
def photo():
    from PIL import Image

    return Image.open(EXAMPLES / "coffee-cup.jpg").convert("RGB")


@contextlib.contextmanager
def transformer_batch_sizes(editor):
    """Record the batch size of every transformer call `editor` makes inside the `with` block."""
    seen: list[int] = []
    original = editor.pipe.transformer.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["hidden_states"].shape[0])
        return original(*args, **kwargs)

    editor.pipe.transformer.forward = spy
    try:
        yield seen
    finally:
        del editor.pipe.transformer.forward


def block_call(transformer, seed: int):
    """(args, rotary frequencies) for one call of `transformer`'s first block on CPU: 16 image and 6 text
    tokens, no prompt mask, a random timestep embedding."""
    import torch

    dim = transformer.inner_dim
    torch.manual_seed(seed)
    args = (torch.randn(1, 16, dim), torch.randn(1, 6, dim), None, torch.randn(1, dim))
    rotary = transformer.pos_embed([[(1, 4, 4)]], max_txt_seq_len=6, device=torch.device("cpu"))
    return args, rotary


def small_request(image, **kw):
    """A cheap request for the tiny model: small output, condition encoded at the output's area."""
    from qie import EditRequest

    params = {
        "prompt": "replace the background with white",
        "steps": 3,
        "seed": 1,
        "max_side": 128,
        "condition_area": "output",
    }
    params.update(kw)
    return EditRequest(images=[image], **params)


@pytest.fixture(scope="session")
def oracle_case(tiny_editor):
    """A small request and its stock diffusers reference image (computed once: the reference is slow on CPU)."""
    from PIL import Image

    from qie import EditRequest

    image = Image.open(EXAMPLES / "cat.jpg").convert("RGB")
    # The stock pipeline encodes its inputs at ~1024² whatever the output size: ask for the same.
    request = EditRequest(
        images=[image], prompt="make the cat wear a red hat", steps=3, seed=123, max_side=128, condition_area="model"
    )
    return request, tiny_editor.reference(request)


# --- a real redis-server for the result-cache and serve tests -----------------------------------
@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    from redis_server import redis_server

    with redis_server(str(tmp_path_factory.mktemp("redis"))) as url:
        yield url


def clone_editor(editor, **attrs):
    """A second `Editor` on `editor`'s pipeline (its own plan, lock, safety filter), with `attrs` set."""
    from qie import Editor
    from qie.memory.plans import PLANS

    clone = Editor(editor.pipe, model=editor.model, device=editor.device, dtype=editor.dtype, plan=PLANS["resident"])
    for name, value in attrs.items():
        setattr(clone, name, value)
    return clone
