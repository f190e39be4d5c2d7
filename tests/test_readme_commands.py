"""The README's command lines work when pasted: every line with a brace pattern goes through the shell (bash, as a
user's terminal would expand it) and then through Hydra's override parser."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

README = Path(__file__).resolve().parents[1] / "README.md"
HYDRA_ENTRY_POINTS = ("train.py", "evaluate.py")
OVERRIDE = re.compile(r"^[+~]{0,2}[\w.@/-]+=")


def _bash_blocks(text: str) -> list[str]:
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = line.strip() in ("```bash", "```sh", "```shell")
            continue
        if inside and line.strip() and not line.lstrip().startswith("#"):
            lines.append(line.strip())
    return lines


def _inline_overrides(text: str) -> list[str]:
    """Inline code that reads as overrides typed on a command line (`key=value` after the shell's quoting)."""
    spans = re.findall(r"`([^`\n]+)`", text)
    return [s for s in spans if "{" in s and OVERRIDE.match(s.lstrip("\"'"))]


def _shell_words(command: str) -> list[str]:
    """The argument list bash would pass (globbing off: patterns are meant for the program, not the shell)."""
    done = subprocess.run(["bash", "-c", "set -f; printf '%s\\0' " + command], capture_output=True, text=True,
                          check=True)
    return done.stdout.split("\0")[:-1]


def brace_commands() -> list[str]:
    text = README.read_text()
    return [c for c in _bash_blocks(text) if "{" in c] + _inline_overrides(text)


def test_the_readme_shows_brace_patterns():
    commands = brace_commands()
    assert any("{000000..000331}" in c for c in commands), commands
    assert any("pipe:" in c and "{0000..0099}" in c for c in commands), commands


@pytest.mark.parametrize("command", brace_commands())
def test_readme_brace_command_parses(command):
    words = _shell_words(command)
    # the shell passes brace patterns through untouched (an unquoted {a,b} would become several words)
    assert words == shlex.split(command, comments=True), f"the shell changes {command!r} into {words}"
    if words and words[0] == "python":
        if not any(w.endswith(HYDRA_ENTRY_POINTS) for w in words[1:2]):
            return  # not a Hydra program: the shell's word list is what it gets
        words = words[2:]
    overrides = [w for w in words if OVERRIDE.match(w)]
    assert overrides, command
    parsed = OverridesParser.create().parse_overrides(overrides)
    for override in parsed:  # a dict value such as stage.lora='{r: 8}' parses as a dict, as intended
        value = override.value()
        if isinstance(value, str) and ".." in override.input_line:
            assert "{" in value and "}" in value, f"{override.input_line!r} lost its brace pattern: {value!r}"
