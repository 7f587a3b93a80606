"""Every `python3 -m qie ...` command the README and docs/ show parses with today's flags."""

import re
import shlex
from pathlib import Path

import pytest

from qie.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]


def documented_commands() -> list[tuple[str, str]]:
    """(file, command) for each `python3 -m qie` line in a fenced block, continuations joined, comment cut."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        in_block, pending = False, ""
        for line in path.read_text().splitlines():
            if line.startswith("```"):
                in_block, pending = not in_block, ""
                continue
            if not in_block:
                continue
            line = pending + line.strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            if line.startswith("python3 -m qie "):
                found.append((path.name, re.split(r"\s+#\s", line, maxsplit=1)[0]))
    return found


COMMANDS = documented_commands()
SHELL = {"&", "&&", "|", ";", ">", ">>", "2>&1"}


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}:{c[15:55]}" for d, c in COMMANDS])
def test_a_documented_command_parses(doc, command):
    argv = shlex.split(command)[3:]  # after "python3 -m qie", up to a shell operator
    argv = argv[: next((i for i, arg in enumerate(argv) if arg in SHELL), len(argv))]
    argv = [arg.replace("<", "").replace(">", "") for arg in argv]  # placeholders such as bench-<tag>.json
    build_parser().parse_args(argv)  # exits (SystemExit) on a flag or value it does not know
