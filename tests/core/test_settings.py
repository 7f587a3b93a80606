"""`qie.settings`: the one reader of `QIE_*` variables; every value checked, bad ones named with the fix."""

from __future__ import annotations

import ast
import logging
from dataclasses import fields
from pathlib import Path

import pytest

from qie import InvalidRequestError
from qie.settings import VARIABLES, SafetySettings, Settings, read

ROOT = Path(__file__).resolve().parents[2]
# Modules that may read the whole environment (not one variable), and why.
WHOLE_ENVIRONMENT = {
    "qie/telemetry.py": "the log filter masks the values of secret-looking variables",
}


def test_every_variable_from_a_fake_environment():
    env = {
        "QIE_MODEL": "tiny",
        "QIE_REVISION": "v1",
        "QIE_DEVICE": "cpu",
        "QIE_DTYPE": "fp32",
        "QIE_PLAN": "stream",
        "QIE_VRAM_BUDGET": "12.5",
        "QIE_COMPILE": "true",
        "QIE_ATTENTION": "native",
        "QIE_FAST_LORA": "lightning.safetensors",
        "QIE_FAST_STEPS": "4",
        "QIE_LORAS": "ink.safetensors:0.5, owner/style",
        "QIE_SAFETY": "1",
        "QIE_SAFETY_THRESHOLD": "0.6",
        "QIE_SAFETY_CHECK": "outputs",
        "QIE_SAFETY_REQUIRED": "1",
        "QIE_FAULT": "transformer:oom:2:1",
        "QIE_CACHE": "/tmp/qie-cache",
        "QIE_RESULT_CACHE": "/tmp/qie-results",
        "QIE_MAX_INPUT_PIXELS": "1000",
        "QIE_MAX_INPUT_BYTES": "2000",
        "QIE_LOG_PROMPTS": "1",
        "QIE_EDIT_TIMEOUT_S": "30",
        "QIE_GPU_DURATION": "60",
        "QIE_PRELOAD": "yes",
        "QIE_TAG_FONT": "/fonts/noto.ttc",
        "QIE_COMPILE_MODE": "reduce-overhead",
        "QIE_TEXT_ENCODER_FP8": "1",
        "QIE_VAE_COMPILE": "channels-last",
        "QIE_MAX_BATCH_SIZE": "4",
        "QIE_RESULT_CACHE_URL": "redis://h:1/0",
    }
    s = Settings.from_env(env)
    assert (s.model, s.revision, s.device, s.dtype, s.plan) == ("tiny", "v1", "cpu", "fp32", "stream")
    assert (s.vram_budget_gib, s.compile, s.attention, s.fast_lora, s.fast_steps) == (
        12.5,
        True,
        "native",
        "lightning.safetensors",
        4,
    )
    assert s.safety == SafetySettings(model=None, threshold=0.6, inputs=False, outputs=True, required=True)
    assert s.fault == "transformer:oom:2:1"
    assert s.loras == ("ink.safetensors:0.5", "owner/style") and s.engine["loras"] == s.loras
    assert (s.cache_dir, s.result_cache_dir) == (Path("/tmp/qie-cache"), Path("/tmp/qie-results"))
    assert (s.max_input_pixels, s.max_input_bytes, s.log_prompts) == (1000, 2000, True)
    assert (s.edit_timeout_s, s.gpu_duration_s, s.preload, s.tag_font) == (30.0, 60, True, "/fonts/noto.ttc")
    assert s.serve == {"max_batch_size": "4", "cache": "redis://h:1/0"}
    assert (s.compile_mode, s.text_encoder_fp8, s.vae_compile) == ("reduce-overhead", True, "channels-last")
    assert {v.name for v in VARIABLES} <= set(env)  # the test covers every variable


def test_defaults_when_nothing_is_set():
    s = Settings.from_env({})
    assert s == Settings(cache_dir=Path.home() / ".cache" / "qie")
    assert (s.safety, s.fault, s.compile, s.edit_timeout_s, s.gpu_duration_s) == (None, None, False, 900.0, 120)
    assert Settings.from_env({"QIE_SAFETY": "off"}).safety is None
    assert Settings.from_env({"QIE_SAFETY": "/models/clip"}).safety.model == "/models/clip"


@pytest.mark.parametrize(
    ("name", "value", "fix"),
    [
        ("QIE_MAX_INPUT_PIXELS", "lots", "give a whole number of at least 1"),
        ("QIE_MAX_INPUT_BYTES", "0", "give a whole number of at least 1"),
        ("QIE_VRAM_BUDGET", "nan", "give a number"),
        ("QIE_EDIT_TIMEOUT_S", "-5", "e.g. QIE_EDIT_TIMEOUT_S=900"),
        ("QIE_COMPILE", "maybe", "use 1 or 0"),
        ("QIE_SAFETY_CHECK", "everything", "use inputs, outputs or both"),
        ("QIE_SAFETY_THRESHOLD", "high", "e.g. QIE_SAFETY_THRESHOLD=0.8"),
        ("QIE_FAULT", "transformer:explode", "error oom or runtime"),
        ("QIE_FAULT", "transformer:oom:soon", "component:error[:after[:times]]"),
    ],
)
def test_a_bad_value_names_the_variable_the_value_and_the_fix(name, value, fix):
    env = {name: value, "QIE_SAFETY": "1"} if name.startswith("QIE_SAFETY_") else {name: value}
    with pytest.raises(InvalidRequestError, match=f"{name}={value!r} is not valid") as caught:
        Settings.from_env(env)
    assert caught.value.param == name and fix in caught.value.fix


def test_an_unknown_qie_variable_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="qie.settings"):
        Settings.from_env({"QIE_SAFTEY": "1"})
    assert "QIE_SAFTEY is not a qie setting" in caplog.text


def test_read_follows_the_environment_now(monkeypatch):
    from qie.core.images import MAX_INPUT_BYTES, max_input_bytes

    monkeypatch.delenv("QIE_MAX_INPUT_BYTES", raising=False)
    assert max_input_bytes() == MAX_INPUT_BYTES
    monkeypatch.setenv("QIE_MAX_INPUT_BYTES", "1234")
    assert max_input_bytes() == read("max_input_bytes") == 1234


def test_every_settings_field_has_a_source():
    sourced = {v.field for v in VARIABLES} | {"serve"}
    assert {f.name for f in fields(Settings)} <= sourced


def _environment_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, key) of each environment access: key is the variable name, or '*' when not a constant."""
    reads = []
    for node in ast.walk(tree):
        target = key = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            owner = ast.unparse(node.func.value)
            if name == "getenv" or (owner.endswith("environ") and name in ("get", "setdefault", "pop")):
                target, key = node, node.args[0] if node.args else None
            elif owner.endswith("environ") and name in ("items", "keys", "values", "copy"):
                target, key = node, None
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("environ"):
            target, key = node, node.slice
        elif isinstance(node, ast.Compare) and any(ast.unparse(c).endswith("environ") for c in node.comparators):
            target, key = node, node.left
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "dict" and "environ" in ast.unparse(node):
            target, key = node, None
        if target is not None:
            constant = isinstance(key, ast.Constant) and isinstance(key.value, str)
            reads.append((target.lineno, key.value if constant else "*"))
    return reads


def test_only_the_settings_module_reads_qie_variables():
    offenders = []
    for path in sorted([*(ROOT / "qie").rglob("*.py"), ROOT / "app.py"]):
        name = path.relative_to(ROOT).as_posix()
        if name == "qie/settings.py":
            continue
        for line, key in _environment_reads(ast.parse(path.read_text())):
            if key.startswith("QIE_") or (key == "*" and name not in WHOLE_ENVIRONMENT):
                offenders.append(f"{name}:{line} reads {key}")
    assert not offenders, "read QIE_* variables only in qie/settings.py:\n" + "\n".join(offenders)


def test_the_scan_sees_each_kind_of_read():
    source = """
import os
a = os.environ.get("QIE_A")
b = os.getenv("QIE_B")
c = os.environ["QIE_C"]
d = "QIE_D" in os.environ
e = dict(os.environ)
f = os.environ.get(f"QIE_{a}")
g = os.environ.get("HF_HOME")
"""
    keys = [key for _, key in _environment_reads(ast.parse(source))]
    assert sorted(keys) == sorted(["QIE_A", "QIE_B", "QIE_C", "QIE_D", "*", "*", "HF_HOME"])
