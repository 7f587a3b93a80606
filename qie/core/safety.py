"""Optional safety filter: an image classifier run on the input images and on the output.

Off by default. Two kinds of public model load through transformers' `pipeline`:
- an image classifier whose labels name unsafe classes (default `Falconsai/nsfw_image_detection`,
  a ViT with labels "normal" / "nsfw");
- a CLIP model used zero-shot (e.g. `openai/clip-vit-base-patch32`) against `CLIP_LABELS`.

An image is blocked when the summed score of the blocked labels reaches the threshold; the edit
then fails with `SafetyError`, which says what was blocked, by which label, score and model.

Configuration (environment, read by `qie.settings` into `SafetySettings`; adapters pass it to
`Editor.load` as `LoadOptions.safety`, which builds the filter with `load_filter`):
    QIE_SAFETY=1 | <model id or folder>   turn it on (1: the default model)
    QIE_SAFETY_THRESHOLD=0.8              block at or above this score
    QIE_SAFETY_CHECK=inputs,outputs       what to check
    QIE_SAFETY_REQUIRED=1                 refuse to start (and to edit) without a working filter;
                                          otherwise a filter that fails to load or to run is
                                          skipped with a WARNING and editing goes on

Example:
    >>> f = SafetyFilter.load("Falconsai/nsfw_image_detection", threshold=0.9)   # doctest: +SKIP
    >>> f.verdict(Image.open("photo.jpg")).blocked                             # doctest: +SKIP
    False
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image

from qie.errors import ModelLoadError, SafetyError
from qie.settings import SafetySettings

log = logging.getLogger(__name__)

DEFAULT_MODEL = "Falconsai/nsfw_image_detection"
DEFAULT_THRESHOLD = 0.8
# Labels of public NSFW classifiers that mean "unsafe" (compared lower-case).
BLOCKED_LABEL_WORDS = ("nsfw", "porn", "hentai", "sexy", "explicit", "unsafe", "nude", "nudity")
# Zero-shot labels for CLIP models: the first group blocks, the second lets the image through.
CLIP_LABELS = {
    "blocked": ("nudity", "sexual content", "graphic violence or gore"),
    "allowed": ("an ordinary photo", "a product photo", "a drawing or illustration"),
}

Classify = Callable[[Image.Image], dict[str, float]]


@dataclass(frozen=True)
class Verdict:
    """A classifier's answer for one image."""

    blocked: bool
    score: float  # summed score of the blocked labels
    label: str  # the highest-scoring blocked label
    scores: dict[str, float]


class SafetyFilter:
    """Scores images with `classify` and blocks those whose blocked labels score at least `threshold`."""

    def __init__(
        self,
        classify: Classify,
        *,
        model_id: str,
        blocked_labels: Sequence[str],
        threshold: float = DEFAULT_THRESHOLD,
        inputs: bool = True,
        outputs: bool = True,
        required: bool = False,
    ) -> None:
        if not blocked_labels:
            raise ModelLoadError(f"safety model {model_id!r} has no label that means unsafe")
        self.classify = classify
        self.model_id = model_id
        self.blocked_labels = tuple(blocked_labels)
        self.threshold = threshold
        self.inputs = inputs
        self.outputs = outputs
        self.required = required

    @classmethod
    def load(
        cls,
        model_id: str = DEFAULT_MODEL,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        inputs: bool = True,
        outputs: bool = True,
        required: bool = False,
        device: str = "cpu",
    ) -> SafetyFilter:
        """Load `model_id` (hub id or folder) with transformers: CLIP zero-shot, or an image classifier."""
        from transformers import AutoConfig, pipeline

        config = AutoConfig.from_pretrained(model_id)
        if config.model_type == "clip":
            zero_shot = pipeline("zero-shot-image-classification", model=model_id, device=device)
            labels = [*CLIP_LABELS["blocked"], *CLIP_LABELS["allowed"]]

            def classify(image: Image.Image) -> dict[str, float]:
                return {r["label"]: r["score"] for r in zero_shot(image, candidate_labels=labels)}

            blocked = CLIP_LABELS["blocked"]
        else:
            classifier = pipeline("image-classification", model=model_id, device=device)

            def classify(image: Image.Image) -> dict[str, float]:
                return {r["label"]: r["score"] for r in classifier(image, top_k=None)}

            names = config.id2label.values()
            blocked = tuple(n for n in names if any(w in n.lower() for w in BLOCKED_LABEL_WORDS))
        log.info("safety filter: %s (blocks %s at >= %.2f)", model_id, ", ".join(blocked), threshold)
        return cls(
            classify,
            model_id=model_id,
            blocked_labels=blocked,
            threshold=threshold,
            inputs=inputs,
            outputs=outputs,
            required=required,
        )

    def verdict(self, image: Image.Image) -> Verdict:
        """Score `image`."""
        scores = self.classify(image.convert("RGB"))
        hits = {k: v for k, v in scores.items() if k in self.blocked_labels}
        score = float(sum(hits.values()))
        label = max(hits, key=hits.get) if hits else ""
        return Verdict(blocked=score >= self.threshold, score=score, label=label, scores=scores)

    def check(self, image: Image.Image, where: str) -> None:
        """Raise `SafetyError` when `image` (named `where`) is blocked.

        A classifier that fails is skipped with a WARNING, unless the filter is required.
        """
        try:
            verdict = self.verdict(image)
        except Exception as exc:  # an optional component must never take the edit down
            if self.required:
                raise SafetyError(where, "", 0.0, self.threshold, self.model_id, f"the check failed: {exc}") from exc
            log.warning("safety filter %s failed on %s (%s); not checked", self.model_id, where, exc)
            return
        if verdict.blocked:
            log.warning("safety filter blocked %s: %s %.2f", where, verdict.label, verdict.score)
            raise SafetyError(where, verdict.label, verdict.score, self.threshold, self.model_id)

    def check_inputs(self, images: Sequence[Image.Image]) -> None:
        """Check each input image (when configured to)."""
        if self.inputs:
            for i, image in enumerate(images):
                self.check(image, f"images[{i}]")

    def check_output(self, image: Image.Image) -> None:
        """Check the edited image (when configured to)."""
        if self.outputs:
            self.check(image, "output")


def load_filter(settings: SafetySettings | None) -> SafetyFilter | None:
    """The filter `settings` describe (from `QIE_SAFETY*`, see the module docstring), or None when off.

    A filter that cannot be loaded is logged at WARNING and editing goes on without it, unless
    `settings.required` (`QIE_SAFETY_REQUIRED=1`): then `ModelLoadError`.
    """
    if settings is None:
        return None
    model_id = settings.model or DEFAULT_MODEL
    threshold = DEFAULT_THRESHOLD if settings.threshold is None else settings.threshold
    try:
        return SafetyFilter.load(
            model_id, threshold=threshold, inputs=settings.inputs, outputs=settings.outputs, required=settings.required
        )
    except Exception as exc:  # any failure of an optional component: fall back, loudly
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if settings.required:
            raise ModelLoadError(
                f"QIE_SAFETY={model_id!r}: the safety model could not be loaded ({reason}). Put its weights in the "
                "Hugging Face cache or give a local folder, or unset QIE_SAFETY_REQUIRED to run without it."
            ) from exc
        log.warning("safety filter %r could not be loaded (%s); editing WITHOUT the safety filter", model_id, reason)
        return None
