"""Versions of the stack qie runs on, and warnings for combinations known to misbehave."""

from __future__ import annotations

import logging
import platform
from importlib import metadata

__version__ = "0.1.0"

log = logging.getLogger(__name__)

PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "huggingface_hub", "gradio", "torchao")

# Ranges the test suite ran on (kept in step with requirements.txt).
TESTED = {"diffusers": "0.42", "transformers": "5.24", "torch": "2.13"}


def installed() -> dict[str, str | None]:
    """Installed version of each package qie uses (None when absent)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _major_minor(version: str | None) -> tuple[int, int]:
    if not version:
        return (0, 0)
    parts = (version.split("+")[0].split(".") + ["0"])[:2]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)  # type: ignore[return-value]


def known_problems(versions: dict[str, str | None] | None = None) -> list[tuple[int, str]]:
    """(log level, message) for each known-bad combination among `versions` (default: installed).

    Problems qie works around are INFO; the rest are WARNING.
    """
    v = versions or installed()
    problems = []
    if _major_minor(v.get("diffusers")) < (0, 36):
        problems.append(
            (
                logging.WARNING,
                f"diffusers {v.get('diffusers')} has no QwenImageEditPlusPipeline; install diffusers>=0.42",
            )
        )
    if _major_minor(v.get("transformers")) >= (5, 15) and _major_minor(v.get("diffusers")) <= (0, 42):
        problems.append(
            (
                logging.INFO,
                f"diffusers {v.get('diffusers')} with transformers {v.get('transformers')}: the stock pipeline drops "
                "mm_token_type_ids (diffusers #14194) and silently changes prompt embeddings; qie forwards it "
                "(Editor.reference and stock benchmarks keep the upstream behaviour)",
            )
        )
    if v.get("torchao") and "+cpu" in (v.get("torch") or ""):
        problems.append(
            (logging.WARNING, "torchao is installed beside a CPU-only torch: its kernels fail to load; uninstall it")
        )
    return problems


def warn_known_problems() -> None:
    """Log each known problem at start-up."""
    for level, problem in known_problems():
        log.log(level, problem)
