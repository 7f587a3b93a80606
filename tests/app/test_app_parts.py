"""The app's parts without a server: presets, the toggle table, session jobs, start-up checks, CLI flags."""

from __future__ import annotations

import subprocess
import sys
import threading
import types

import pytest
from conftest import ROOT

import qie
from qie.app.jobs import SessionJobs
from qie.app.presets import (
    FEATURES,
    PRESETS,
    Feature,
    capabilities,
    feature_available,
    feature_request_fields,
    load_examples,
    preset_prompt,
)


def test_presets_in_both_languages_fill_the_price_tag():
    assert set(PRESETS) == {"white_background", "remove_watermark", "price_tag", "combined"}
    for key in PRESETS:
        en, zh = preset_prompt(key, "en", "Sale $5"), preset_prompt(key, "zh", "Sale $5")
        assert en != zh and "{tag}" not in en + zh
        assert ("Sale $5" in en and "Sale $5" in zh) == PRESETS[key].uses_tag
    combined = preset_prompt("combined", "en", "Sale $19.9")
    assert "logo" in combined and "white" in combined and "'Sale $19.9'" in combined
    qie.EditRequest(images=[ROOT / "examples" / "cat.jpg"], prompt=preset_prompt("combined", "zh"))


@pytest.mark.parametrize(
    ("args", "param"),
    [(("price_tag", "en", "  "), "price_tag"), (("nope",), "preset"), (("combined", "fr"), "language")],
)
def test_preset_errors_name_the_parameter(args, param):
    with pytest.raises(qie.InvalidRequestError) as err:
        preset_prompt(*args)
    assert err.value.param == param


def test_toggle_is_live_exactly_when_edit_request_has_its_field():
    assert feature_available(Feature("x", field="steps", label="", info="", default=40))
    assert not feature_available(Feature("x", field="no_such_field", label="", info="", default=0))
    assert set(capabilities()) == {"mode", "tile_size", "attention_quant", "early_exit"}


def test_missing_features_are_refused_unless_at_default(monkeypatch):
    monkeypatch.setattr("qie.app.presets.feature_available", lambda f: f.name == "tile_size")
    assert feature_request_fields({"tile_size": "512", "early_exit": False}) == {"tile_size": 512}
    assert feature_request_fields({"tile_size": "off"}) == {"tile_size": None}
    with pytest.raises(qie.InvalidRequestError, match="early_exit=True.*not available in this build"):
        feature_request_fields({"early_exit": True})


def test_examples_are_listed_with_existing_images():
    examples = load_examples(ROOT / "examples")
    assert len(examples) >= 3 and all(e.image.is_file() and e.prompt and e.prompt_zh for e in examples)


def test_session_jobs_cancel_reaches_only_the_running_job():
    jobs = SessionJobs()
    assert jobs.cancel("a") is None
    with jobs.job("a") as job:
        assert jobs.cancel("b") is None and not job.is_set()
        assert jobs.cancel("a") is job and job.is_set()
    assert jobs.cancel("a") is None
    with jobs.job("a") as fresh:
        assert not fresh.is_set()


def test_importing_the_app_loads_no_model_code():
    code = "import sys, app; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_flags_default_to_localhost_and_bind_all_on_a_space(monkeypatch):
    from qie.app import main as app

    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    args = app.build_parser().parse_args([])
    assert (args.host, args.share, args.mcp, args.preload) == ("127.0.0.1", False, False, False)
    monkeypatch.setenv("SPACE_ID", "user/qie")
    monkeypatch.setenv("QIE_MODEL", "tiny")
    args = app.build_parser().parse_args([])
    assert (args.host, args.model, args.preload) == ("0.0.0.0", "tiny", True)


def test_without_a_gpu_the_real_model_gets_a_notice_naming_the_tiny_demo(monkeypatch):
    from qie.app import main as app

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    notice = app.startup_notice("Qwen/Qwen-Image-Edit-2509")
    assert "needs a CUDA GPU" in notice and "python app.py --model tiny" in notice
    assert app.startup_notice("tiny") is None


def test_zero_gpu_decorator_applies_only_when_spaces_is_installed(monkeypatch):
    from qie.app import main as app

    def fn():
        return "ran"

    monkeypatch.setitem(sys.modules, "spaces", None)  # not installed
    assert app._on_gpu(fn) is fn
    wrapped = []
    fake = types.SimpleNamespace(GPU=lambda duration: lambda f: wrapped.append(duration) or f)
    monkeypatch.setitem(sys.modules, "spaces", fake)
    assert app._on_gpu(fn)() == "ran" and wrapped == [120]


def test_resource_error_in_the_app_tells_how_to_start_the_tiny_demo():
    from app_server import close, launch
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    def no_gpu():
        raise qie.ResourceError("model='Qwen/Qwen-Image-Edit-2509' needs a CUDA GPU and none was found.")

    demo, url = launch(factory=no_gpu, notice="no GPU here")
    try:
        client = Client(url, verbose=False)
        with pytest.raises(AppError, match="needs a CUDA GPU.*python app.py --model tiny"):
            client.predict(
                image=handle_file(str(ROOT / "examples" / "cat.jpg")), prompt="white background", api_name="/edit"
            )
    finally:
        close(demo)


def test_thread_safety_of_session_jobs():
    board = SessionJobs()
    errors = []

    def worker(i):
        try:
            for _ in range(200):
                with board.job(f"s{i % 3}"):
                    board.cancel(f"s{(i + 1) % 3}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_start_values_follow_the_defaults_given():
    from qie.app import main as app
    from qie.app.presets import CPU_DEMO_DEFAULTS

    demo = app.build_demo(lambda: None, defaults=CPU_DEMO_DEFAULTS)
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert by_id["steps"].value == CPU_DEMO_DEFAULTS["steps"]
    assert by_id["max-side"].value == CPU_DEMO_DEFAULTS["max_side"]
    assert by_id["condition-area"].value == "output"
    assert app.build_demo(lambda: None).blocks  # the model card's settings otherwise


@pytest.mark.parametrize("live", [False, True])
def test_toggles_are_disabled_with_a_note_until_their_engine_exists(monkeypatch, live):
    from qie.app import main as app

    monkeypatch.setattr("qie.app.layout.feature_available", lambda feature: live)
    demo = app.build_demo(lambda: None, fast_lora=True)
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    for name, feature in FEATURES.items():
        control = by_id[f"feature-{name.replace('_', '-')}"]
        assert control.interactive is live
        assert ("Not available in this build" in control.info) is not live
        assert feature.info in control.info


def test_fast_mode_is_disabled_without_a_fast_lora_and_says_which_flag():
    from qie.app import main as app

    def mode_control(demo):
        return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "feature-mode")

    off = mode_control(app.build_demo(lambda: None))
    assert off.interactive is False and "start the app with --fast-lora" in off.info
    assert "fast_lora=" not in off.info
    on = mode_control(app.build_demo(lambda: None, fast_lora=True))
    assert on.interactive is not False and "--fast-lora" not in on.info


def test_examples_are_cached_per_model_revision_and_version_and_not_for_tiny(monkeypatch):
    import os

    from qie.app import main as app

    seen = []

    def recorder(**kwargs):
        seen.append((os.environ.get("GRADIO_EXAMPLES_CACHE"), kwargs["cache_examples"], kwargs["run_on_click"]))

    monkeypatch.setattr(app.gr, "Examples", recorder)
    names = {
        app.examples_cache_name("Qwen/Qwen-Image-Edit-2509", None),
        app.examples_cache_name("Qwen/Qwen-Image-Edit-2511", None),
        app.examples_cache_name("Qwen/Qwen-Image-Edit-2509", "abc123"),
    }
    assert len(names) == 3 and all(qie.__version__ in name for name in names)
    assert app.examples_cache_name("tiny", None) is None
    app.build_demo(lambda: None, examples_cache=app.examples_cache_name("Qwen/Qwen-Image-Edit-2509", None))
    app.build_demo(lambda: None, examples_cache=None)
    assert len(seen) == 4  # English and Chinese examples, in each app
    (folder, cached, on_click), (_, tiny_cached, tiny_on_click) = seen[0], seen[-1]
    assert folder.endswith("Qwen--Qwen-Image-Edit-2509@main-qie" + qie.__version__) and cached and not on_click
    assert not tiny_cached and tiny_on_click


def test_rewrite_runs_once_per_instruction_and_the_persons_text_wins():
    import gradio as gr

    from qie.app.form import EditForm
    from qie.app.handlers import Handlers

    class Editor:
        calls: list[str] = []

        def rewrite_prompt(self, images, prompt, language, timeout=None):
            self.calls.append(f"{prompt}/{language}")
            return "a precise instruction"

    image = ROOT / "examples" / "cat.jpg"
    request = qie.EditRequest(images=[image], prompt="white", steps=2)
    handlers = Handlers(None, lambda: None, start={})
    editor, progress = Editor(), gr.Progress()
    fresh = EditForm(image=None, prompt="white", rewrite=True, language="zh")
    requests, shown = handlers._rewritten(editor, fresh, [request, request], progress)
    assert [r.prompt for r in requests] == ["a precise instruction"] * 2 and shown["seconds"] is not None
    edited = EditForm(image=None, prompt="white", rewrite=True, rewritten="my words", rewritten_from="white")
    requests, shown = handlers._rewritten(editor, edited, [request], progress)
    assert requests[0].prompt == "my words" and shown["seconds"] is None
    assert editor.calls == ["white/zh"]  # the person's edit of the same instruction is not rewritten again
    changed = EditForm(image=None, prompt="black", rewrite=True, rewritten="my words", rewritten_from="white")
    assert changed.prompt_to_rewrite()
    assert handlers._rewritten(editor, EditForm(image=None, prompt="white"), [request], progress) == ([request], None)


def test_cancel_reports_an_edit_that_gradio_stopped_a_moment_before():
    import time as clock

    from qie.app.jobs import SessionJobs

    jobs = SessionJobs()
    with jobs.job("tab") as job:
        job.on_step(3, 40)
    assert jobs.just_stopped("tab") is None  # finished normally: nothing to report
    with jobs.job("tab") as job:
        job.on_step(5, 40)
        job.set()  # Gradio's cancel reached it first
    job.ended = clock.monotonic()
    assert jobs.just_stopped("tab") is job and job.progress_text() == "Cancelled after 5 of 40 steps."
    job.ended -= 60
    assert jobs.just_stopped("tab") is None
