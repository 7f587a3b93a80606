"""Library messages in the CLI's words: `device='cpu'` becomes `--device cpu`, `max_side` becomes `--max-side`.

The library names its Python parameters; on the command line a person knows the flags.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> _ = parser.add_argument("--max-side", type=int)
    >>> in_cli_words("max_side=96 is not valid: raise max_side to at least 1024", flag_names(parser))
    '--max-side 96 is not valid: raise --max-side to at least 1024'
"""

from __future__ import annotations

import argparse
import re
import shlex

# Library names whose flag is spelled differently (EditRequest field -> CLI flag).
ALIASES = {"true_cfg_scale": "--cfg", "vram_budget_gib": "--vram-budget", "fast_lora": "--fast-lora"}
_ASSIGNMENT = re.compile(r"\b([a-z][a-z0-9_]*)=('([^']*)'|\"([^\"]*)\"|([^\s,;:)]+))")
_IMAGE = re.compile(r"\bimages\[(\d+)\]=")
_IDENTIFIER = re.compile(r"\b([a-z][a-z0-9]*_[a-z0-9_]+)\b")


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Every destination name of `parser` and its subcommands, mapped to its long flag."""
    names = dict(ALIASES)
    parsers, seen = [parser], set()
    while parsers:
        current = parsers.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            elif action.option_strings:
                longs = [o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")]
                names.setdefault(action.dest, (longs or action.option_strings)[0])
    return names


def in_cli_words(text: str, flags: dict[str, str]) -> str:
    """`text` with `name=value` and bare `snake_case` names of known parameters as flags."""

    def assignment(match: re.Match) -> str:
        flag = flags.get(match.group(1))
        if flag is None:
            return match.group(0)
        value = next(v for v in match.groups()[2:] if v is not None)
        return f"{flag} {shlex.quote(value)}"

    text = _IMAGE.sub(lambda m: f"input image {int(m.group(1)) + 1}: ", text)
    text = _ASSIGNMENT.sub(assignment, text)
    return _IDENTIFIER.sub(lambda m: flags.get(m.group(1), m.group(0)), text)
