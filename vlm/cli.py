"""The one command-line style of the `python -m vlm....` tools: `key=value` words, as train.py and evaluate.py take
Hydra overrides. A tool declares its keys with their defaults (`REQUIRED` for none); values are read as YAML
scalars (`num_train=24` is a number, `quiet=true` a bool), a word that is no `key=value`, an unknown key, a missing
required key or a value of the wrong type ends the tool with its usage line, before anything is done.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

REQUIRED = object()  # a key without a default: the tool refuses to run without it


def usage_line(prog: str, spec: Mapping[str, Any]) -> str:
    """`usage: python -m PROG key=KEY ... [key=default] ...` from a tool's declared keys."""
    words = [f"{k}={k.upper()}" if v is REQUIRED else f"[{k}={_show(v)}]" for k, v in spec.items()]
    return f"usage: python -m {prog} " + " ".join(words)


def _show(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def parse_options(argv: Sequence[str] | None, prog: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """`key=value` words -> {key: value} over the declared defaults; `-h`/`--help` prints the usage and exits."""
    from omegaconf import OmegaConf

    words = list(sys.argv[1:] if argv is None else argv)
    usage = usage_line(prog, spec)
    if any(w in ("-h", "--help") for w in words):
        print(usage)
        raise SystemExit(0)
    problems = [f"not key=value: {w!r}" for w in words if "=" not in w or w.startswith("=")]
    given: dict[str, Any] = {}
    if not problems:
        given = OmegaConf.to_container(OmegaConf.from_dotlist(words))
    problems += [f"unknown key {k!r} (known: {', '.join(spec)})" for k in given if k not in spec]
    problems += [f"{k}= is required" for k, v in spec.items() if v is REQUIRED and given.get(k) in (None, "")]
    for key, value in given.items():
        default = spec.get(key)
        if isinstance(default, bool) and not isinstance(value, bool):
            problems.append(f"{key}= takes true or false, not {value!r}")
        elif isinstance(default, int) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, int)):
            problems.append(f"{key}= takes a whole number, not {value!r}")
        elif isinstance(value, (dict, list)) and not isinstance(default, (dict, list)):
            problems.append(f"{key}= takes one value, not {value!r}")
    if problems:
        raise SystemExit(usage + "\n" + "\n".join(problems))
    for key, value in given.items():  # a path or a name that YAML reads as a number (out=2024) stays as typed
        if (spec[key] is REQUIRED or isinstance(spec[key], str)) and not isinstance(value, str):
            given[key] = str(value)
    return {k: (None if v is REQUIRED else v) for k, v in spec.items()} | given
