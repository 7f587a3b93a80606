"""The CLI on a bad day: outputs it cannot write, name collisions, non-images, a full disk, Ctrl-C;
and what it shows: help, progress, JPEG/WebP with metadata, errors in flag words.

Most tests run `main()` in-process on the session's tiny editor (no model load per test).
"""

from __future__ import annotations

import errno
import logging
import subprocess
import sys

import pytest
from conftest import EXAMPLES, ROOT
from PIL import Image

from qie.cli.main import main
from qie.core.editor import Editor
from qie.core.outputs import read_metadata

FAST = ["--steps", "2", "--max-side", "128", "--condition-area", "output", "--seed", "5", "--model", "tiny"]


@pytest.fixture()
def cli(tiny_editor, monkeypatch, capsys):
    """Run `python -m qie ...` in-process; returns (exit code, stdout, stderr) and how often a model loaded."""
    loads = []

    def load(*args, **kwargs):
        loads.append(args)
        return tiny_editor

    monkeypatch.setattr(Editor, "load", staticmethod(load))
    requests_log = logging.getLogger("qie.requests")
    notices = logging.getLogger("diffusers.models.modeling_utils")
    level, filters = requests_log.level, list(notices.filters)

    def run(*args):
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    run.loads = loads
    yield run
    requests_log.setLevel(level)
    notices.filters[:] = filters


def messages(err: str) -> list[str]:
    """stderr without the progress bars."""
    return [line for line in err.replace("\r", "\n").split("\n") if line.strip() and "%|" not in line]


def photos(folder, *names):
    folder.mkdir(exist_ok=True)
    for name in names:
        Image.open(EXAMPLES / "cat.jpg").resize((96, 64)).save(folder / name)
    return folder


@pytest.mark.parametrize(
    ("output", "says"),
    [
        (lambda tmp: tmp, "is a folder"),
        (lambda tmp: (tmp / "file.txt").write_text("x") and tmp / "file.txt" / "o.png", "not a folder"),
        (lambda tmp: tmp / "o.gif", ".gif is not a format qie writes"),
    ],
)
def test_unwritable_output_is_refused_before_the_edit(cli, tmp_path, output, says):
    target = output(tmp_path)
    code, _, err = cli("edit", str(EXAMPLES / "cat.jpg"), "--prompt", "x", "--output", str(target), *FAST)
    assert code == 2 and says in err and "Traceback" not in err
    assert err.startswith("error: cannot write") and err.count("\n") == 1
    assert not cli.loads, "the model loaded before the output was checked"
    assert not list(tmp_path.rglob("*.partial"))


@pytest.mark.parametrize("suffix", ["jpg", "jpeg", "webp", "png"])
def test_output_format_follows_the_suffix_with_metadata(cli, tmp_path, suffix):
    out = tmp_path / f"o.{suffix}"
    code, stdout, err = cli("edit", str(EXAMPLES / "cat.jpg"), "--prompt", "add a hat", "--output", str(out), *FAST)
    assert code == 0, err
    with Image.open(out) as img:
        assert img.format == {"jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}[suffix]
        if suffix != "png":
            assert b"qie:parameters" in img.info["xmp"]
    meta = read_metadata(out)
    assert meta["prompt"] == "add a hat" and meta["seed"] == 5 and meta["steps"] == 2
    assert f"wrote {out}" in stdout


def test_folder_names_colliding_outputs_apart_and_lists_what_it_leaves_out(cli, tmp_path):
    src = photos(tmp_path / "in", "same.jpg", "same.png", "other.webp")
    (src / "logo.svg").write_text("<svg/>")
    (src / "sub").mkdir()
    out = tmp_path / "out"
    code, stdout, err = cli("edit", str(src), "--prompt", "x", "--output", str(out), *FAST)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["other.png", "same-jpg.png", "same-png.png"]
    assert "not taken: logo.svg: .svg is not an image type" in stdout
    assert "not taken: sub: a folder" in stdout
    assert "same.jpg -> same-jpg.png" in stdout
    assert "3 edited, 0 skipped (output exists), 0 failed, 2 not images" in stdout


def full_disk(monkeypatch, after: int = 0):
    """Make image writes fail with ENOSPC after `after` successful ones, leaving bytes behind as a real one would."""
    original, calls = Image.Image.save, []

    def save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) > after:
            with open(fp, "wb") as fh:
                fh.write(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)


def test_full_disk_stops_a_folder_run_with_one_line_and_no_partial_files(cli, tmp_path, monkeypatch):
    src = photos(tmp_path / "in", "a.jpg", "b.jpg", "c.jpg")
    out = tmp_path / "out"
    full_disk(monkeypatch, after=1)
    code, _, err = cli("edit", str(src), "--prompt", "x", "--output", str(out), *FAST)
    assert code == 1 and "Traceback" not in err
    assert len(messages(err)) == 1, err
    assert "the disk is full" in err and "1 of 3 edited" in err and "run the same command again to resume" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]  # no half-written b.png, no .partial


def test_full_disk_on_a_single_edit_is_one_line(cli, tmp_path, monkeypatch):
    full_disk(monkeypatch)
    code, _, err = cli("edit", str(EXAMPLES / "cat.jpg"), "--prompt", "x", "--output", str(tmp_path / "o.png"), *FAST)
    assert code == 2 and messages(err)[0].startswith("error: cannot write") and "disk is full" in err
    assert "Traceback" not in err and not list(tmp_path.iterdir())


def test_ctrl_c_prints_one_line_and_the_resume_hint(cli, tmp_path, monkeypatch, tiny_editor):
    src = photos(tmp_path / "in", "a.jpg", "b.jpg")
    monkeypatch.setattr(tiny_editor, "edit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    code, _, err = cli("edit", str(src), "--prompt", "x", "--output", str(tmp_path / "out"), *FAST)
    assert code == 130 and "Traceback" not in err
    assert messages(err) == ["interrupted: 0 of 2 edited, 0 already done; run the same command again to resume"]
    code, _, err = cli("edit", str(EXAMPLES / "cat.jpg"), "--prompt", "x", "--output", str(tmp_path / "o.png"), *FAST)
    assert code == 130 and "interrupted" in err and "Traceback" not in err


def test_errors_name_flags_not_python_arguments(cli, tmp_path):
    wide = tmp_path / "wide.png"
    Image.new("RGB", (2000, 125), "white").save(wide)
    code, _, err = cli("edit", str(wide), "--prompt", "x", "--output", str(tmp_path / "o.png"), "--max-side", "96")
    assert code == 2 and "--max-side 96 is not valid" in err and "raise --max-side to at least 1024" in err
    assert "max_side" not in err


def test_help_shows_defaults_choices_and_examples(capsys):
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    text = capsys.readouterr().out
    assert "denoising steps, 2-100" in text and "(default: 40)" in text
    assert "output height in px" in text and "output width in px" in text
    assert "{auto,model,output}" in text and "(default: 40)" in text
    assert "examples:" in text and "--model tiny" in text


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qie", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_single_edit_shows_progress_and_keeps_logs_for_verbose(tiny_dir, tmp_path):
    args = ["edit", str(EXAMPLES / "cat.jpg"), "--prompt", "x", "--output", str(tmp_path / "o.png"), *FAST]
    quiet = run_cli(*args)
    assert quiet.returncode == 0, quiet.stderr
    assert "denoising" in quiet.stderr and "2/2" in quiet.stderr
    assert '"event": "edit"' not in quiet.stderr and "experimental feature" not in quiet.stderr
    verbose = run_cli("-v", *args)
    assert '"event": "edit"' in verbose.stderr and "experimental feature" in verbose.stderr
