"""The optional safety filter: real transformers loading (tiny random models), verdicts, fallbacks."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import clone_editor, small_request
from PIL import Image
from safety_models import tiny_clip, tiny_nsfw_classifier

from qie import ModelLoadError, SafetyError
from qie.core.safety import SafetyFilter, load_filter
from qie.settings import Settings


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    return {v: tiny_nsfw_classifier(root / v, verdict=v) for v in ("nsfw", "normal")}


def test_classifier_loads_and_blocks_the_input_with_reasons(classifiers, tiny_editor, photo, caplog):
    safety = SafetyFilter.load(str(classifiers["nsfw"]), threshold=0.8)
    assert safety.blocked_labels == ("nsfw",)
    editor = clone_editor(tiny_editor, safety=safety)
    with caplog.at_level(logging.INFO, logger="qie.requests"), pytest.raises(SafetyError) as info:
        editor.edit(small_request(photo, steps=2))
    message = str(info.value)
    assert "images[0] was blocked by the safety filter" in message and "'nsfw' scored 1.00" in message
    assert str(classifiers["nsfw"]) in message and info.value.where == "images[0]"
    record = json.loads(caplog.records[-1].getMessage())
    assert record["outcome"] == "blocked" and record["error"] == "SafetyError"
    assert not editor.lock.locked()


def test_safe_images_pass_and_output_is_checked(classifiers, tiny_editor, photo):
    checked = []
    safety = SafetyFilter.load(str(classifiers["normal"]))
    classify = safety.classify
    safety.classify = lambda image: checked.append(image.size) or classify(image)
    result = clone_editor(tiny_editor, safety=safety).edit(small_request(photo, steps=2))
    assert checked == [photo.size, result.image.size]  # the input, then the output


def test_output_only_check_blocks_the_output(classifiers, tiny_editor, photo):
    safety = SafetyFilter.load(str(classifiers["nsfw"]), inputs=False)
    with pytest.raises(SafetyError, match="output was blocked"):
        clone_editor(tiny_editor, safety=safety).edit(small_request(photo, steps=2))


def test_clip_zero_shot_model(tmp_path):
    folder = tiny_clip(tmp_path / "clip")
    image = Image.new("RGB", (48, 40), (200, 10, 10))
    strict = SafetyFilter.load(str(folder), threshold=0.0)  # any score blocks
    assert strict.blocked_labels == ("nudity", "sexual content", "graphic violence or gore")
    verdict = strict.verdict(image)
    assert verdict.blocked and 0 < verdict.score < 1 and len(verdict.scores) == 6
    assert not SafetyFilter.load(str(folder), threshold=1.01).verdict(image).blocked


def safety_from(env):
    return load_filter(Settings.from_env(env).safety)


def test_off_by_default_and_load_failure_falls_back(tmp_path, caplog):
    assert safety_from({}) is None and safety_from({"QIE_SAFETY": "0"}) is None
    missing = {"QIE_SAFETY": str(tmp_path / "no-such-model")}
    with caplog.at_level(logging.WARNING):
        assert safety_from(missing) is None
    assert "WITHOUT the safety filter" in caplog.text
    with pytest.raises(ModelLoadError, match="unset QIE_SAFETY_REQUIRED"):
        safety_from({**missing, "QIE_SAFETY_REQUIRED": "1"})


def test_env_configuration(classifiers):
    env = {"QIE_SAFETY": str(classifiers["normal"]), "QIE_SAFETY_THRESHOLD": "0.5", "QIE_SAFETY_CHECK": "outputs"}
    safety = safety_from(env)
    assert (safety.threshold, safety.inputs, safety.outputs) == (0.5, False, True)


def test_classifier_failure_skips_with_warning_unless_required(classifiers, caplog):
    safety = SafetyFilter.load(str(classifiers["nsfw"]))
    safety.classify = lambda image: 1 / 0
    with caplog.at_level(logging.WARNING):
        safety.check(Image.new("RGB", (16, 16)), "output")  # not blocked: skipped
    assert "not checked" in caplog.text
    safety.required = True
    with pytest.raises(SafetyError, match="the check failed"):
        safety.check(Image.new("RGB", (16, 16)), "output")


def test_editor_keeps_working_when_the_filter_cannot_load(tmp_path, tiny_editor, photo, caplog):
    with caplog.at_level(logging.WARNING):
        editor = clone_editor(tiny_editor, safety=safety_from({"QIE_SAFETY": str(tmp_path / "missing-classifier")}))
    assert editor.safety is None and "WITHOUT the safety filter" in caplog.text
    assert editor.edit(small_request(photo, steps=2)).image.size == (128, 96)
