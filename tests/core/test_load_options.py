"""`LoadOptions`: one set of engine flags for the CLI, the app and serve; checked once, errors in each one's words."""

from __future__ import annotations

import argparse

import pytest
from conftest import clone_editor

from qie import Editor, InvalidRequestError
from qie.core.load_options import COMPILE_MODES, DTYPE_NAMES, FAST_STEPS, PLAN_NAMES, LoadOptions
from qie.settings import SafetySettings, Settings

FLAGS = ["--model", "--revision", "--device", "--dtype", "--plan", "--vram-budget", "--compile", "--attention"]
FLAGS += ["--fast-lora", "--fast-steps", "--fast-fuse", "--compile-mode", "--text-encoder-fp8", "--vae-compile"]


def parse(argv: list[str], defaults: LoadOptions | None = None, **kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    LoadOptions.add_arguments(parser, defaults, **kw)
    return parser.parse_args(argv)


def test_flags_round_trip():
    argv = ["--model", "tiny", "--revision", "main", "--device", "cpu", "--dtype", "fp32", "--plan", "stream"]
    argv += ["--vram-budget", "12", "--compile", "--attention", "native", "--fast-lora", "l.safetensors"]
    argv += ["--fast-steps", "4", "--no-fast-fuse", "--compile-mode", "max-autotune-no-cudagraphs"]
    argv += ["--text-encoder-fp8", "--vae-compile", "channels-last"]
    options = LoadOptions.from_args(parse(argv))
    assert options == LoadOptions(
        model="tiny",
        revision="main",
        device="cpu",
        dtype="fp32",
        plan="stream",
        vram_budget_gib=12.0,
        compile=True,
        attention="native",
        fast_lora="l.safetensors",
        fast_steps=4,
        fast_fuse=False,
        compile_mode="max-autotune-no-cudagraphs",
        text_encoder_fp8=True,
        vae_compile="channels-last",
    )


def test_defaults_round_trip_including_the_fields_without_flags():
    defaults = LoadOptions(
        model="tiny",
        plan="resident",
        fast_fuse=False,
        fixes={"mm_token_type_ids": False},
        safety=SafetySettings(threshold=0.5),
        fault="vae:runtime",
    )
    assert LoadOptions.from_args(parse([], defaults)) == defaults
    assert LoadOptions.from_args(parse([], defaults, skip=("fast_fuse",))) == defaults
    assert LoadOptions.from_args(parse([])) == LoadOptions()


def test_lora_flag_repeats_and_a_bad_scale_names_the_flag():
    options = LoadOptions.from_args(parse(["--lora", "ink.safetensors:0.5", "--lora", "owner/style"]))
    assert options.loras == ("ink.safetensors:0.5", "owner/style")
    env_default = LoadOptions(loras=["from-env.safetensors"])  # a list is kept as a tuple
    assert LoadOptions.from_args(parse(["--lora", "x.safetensors"], env_default)).loras == (
        "from-env.safetensors",
        "x.safetensors",
    )
    with pytest.raises(InvalidRequestError, match="^--lora='ink.safetensors:50'.*from -10 to 10"):
        LoadOptions.from_args(parse(["--lora", "ink.safetensors:50"]))


def test_every_flag_is_there_with_its_help_and_default():
    parser = argparse.ArgumentParser()
    LoadOptions.add_arguments(parser, LoadOptions(plan="stream"))
    text = parser.format_help()
    for flag in FLAGS:
        assert flag in text
    assert "memory plan (default: stream)" in text and "{auto,resident,resident-fp8" in text


def test_from_env_reads_the_settings_then_overrides():
    settings = Settings.from_env({"QIE_MODEL": "tiny", "QIE_VRAM_BUDGET": "8", "QIE_SAFETY": "1", "QIE_COMPILE": "1"})
    options = LoadOptions.from_env(settings, plan="stream")
    assert (options.model, options.vram_budget_gib, options.compile, options.plan) == ("tiny", 8.0, True, "stream")
    assert options.safety == SafetySettings()
    assert LoadOptions.from_env(Settings.from_env({})) == LoadOptions()


@pytest.mark.parametrize(
    ("field", "value", "flag", "variable"),
    [
        ("plan", "fastest", "--plan", "QIE_PLAN"),
        ("vram_budget_gib", -2.0, "--vram-budget", "QIE_VRAM_BUDGET"),
        ("fast_steps", 6, "--fast-steps", "QIE_FAST_STEPS"),
        ("dtype", "int8", "--dtype", "QIE_DTYPE"),
        ("device", "GPU 0", "--device", "QIE_DEVICE"),
        ("compile_mode", "fastest", "--compile-mode", "QIE_COMPILE_MODE"),
        ("vae_compile", "yes", "--vae-compile", "QIE_VAE_COMPILE"),
    ],
)
def test_a_bad_value_is_named_in_the_words_of_its_source(field, value, flag, variable):
    with pytest.raises(InvalidRequestError, match=f"^{field}=") as caught:
        LoadOptions(**{field: value})
    fix = caught.value.fix
    namespace = parse([])
    setattr(namespace, flag.removeprefix("--").replace("-", "_"), value)  # past argparse's own checks
    with pytest.raises(InvalidRequestError, match=f"^{flag}=") as caught:
        LoadOptions.from_args(namespace)
    assert caught.value.fix == fix
    with pytest.raises(InvalidRequestError, match=f"^{variable}="):
        LoadOptions.from_env(Settings.from_env({variable: str(value)}))


def test_the_cli_names_the_flag(capsys):
    from qie.cli.main import main

    assert main(["soak", "--model", "tiny", "--vram-budget", "0"]) == 2
    assert "error: --vram-budget=0.0 is not valid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["soak", "--model", "tiny", "--compile-mode", "turbo"])
    assert "--compile-mode: invalid choice: 'turbo'" in capsys.readouterr().err


def test_allowed_values_match_the_mechanisms():
    from qie.core.models import resolve_dtype
    from qie.core.registry import MODELS
    from qie.memory.plans import PLANS
    from qie.speed.compile import check_mode

    assert set(PLAN_NAMES) == {"auto", *PLANS}
    for mode in COMPILE_MODES:
        check_mode(mode)
    assert FAST_STEPS == (4, 8) == MODELS["2509"].lightning.steps == MODELS["2511"].lightning.steps
    for name in DTYPE_NAMES:
        resolve_dtype(None, name)


def test_editor_load_takes_options_or_a_name_and_overrides(tiny_editor):
    with pytest.raises(InvalidRequestError, match="^plann="):
        Editor.load("tiny", plann="stream")  # checked before anything loads
    editor = Editor.load(LoadOptions(model="tiny", fault="transformer:oom:5"), plan="resident")
    try:
        assert (editor.model, editor.plan.name, editor.fault.component, editor.fault.after) == (
            "tiny",
            "resident",
            "transformer",
            5,
        )
    finally:
        editor.fault.remove()
    assert tiny_editor.fault is None and tiny_editor.safety is None


def test_the_editor_does_not_read_the_environment(tiny_editor, monkeypatch, tmp_path):
    monkeypatch.setenv("QIE_FAULT", "transformer:oom")
    monkeypatch.setenv("QIE_SAFETY", str(tmp_path / "classifier"))
    monkeypatch.setenv("QIE_SAFETY_REQUIRED", "1")  # would raise if the constructor loaded a filter
    editor = clone_editor(tiny_editor)
    assert editor.fault is None and editor.safety is None


def test_the_process_wide_editor_is_configured_by_the_environment(monkeypatch):
    import qie
    from qie.core.editor import current_editor

    before = current_editor()
    monkeypatch.setenv("QIE_MODEL", "tiny")
    monkeypatch.setenv("QIE_FAULT", "vae:runtime:3")
    qie.set_editor(None)
    try:
        editor = qie.get_editor()
        assert (editor.model, editor.fault.component, editor.fault.after) == ("tiny", "vae", 3)
        assert qie.get_editor() is editor
        editor.fault.remove()
    finally:
        qie.set_editor(before)
