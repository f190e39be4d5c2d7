"""Named models from the Hugging Face hub: one short, actionable error when one cannot be loaded.

Loading a tokenizer, decoder, encoder or processor by hub name offline (or a name that is not in the cache) ends in
a long chain of connection errors that never says which model or what to do. `named_model(...)` turns it into a
`ModelNotFoundError` naming the model, the config key that chose it, where it looked and how to fix it; the entry
points print that message alone (`friendly_errors`), with the full traceback only under HYDRA_FULL_ERROR=1.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ModelNotFoundError(OSError):
    """A named model, tokenizer or processor that could not be loaded; the message says how to fix it."""


def _offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1) or Path(name).exists()


def not_found_message(name: str, what: str, key: str, cause: BaseException | None = None) -> str:
    """What was asked for, where it was looked for, and the three ways to fix it."""
    from huggingface_hub import constants

    if _looks_local(name):
        return (f"cannot load the {what} {name!r} ({key}): no such local directory (or it lacks the {what}'s "
                f"files). Point {key} at a directory that holds it, or at a hub name.")
    where = f"neither a local directory nor in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if _offline():
        where += " and the hub is offline (HF_HUB_OFFLINE=1)"
    else:
        reason = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else "unreachable"
        where += f" and the hub could not provide it ({reason[:160]})"
    return (f"cannot load the {what} {name!r} ({key}): it is {where}. To fix: with network, set "
            f"HF_HUB_OFFLINE=0; or download it first: hf download {name} (huggingface-cli download {name} with an "
            f"older huggingface_hub); or point {key} at a local directory.")


@contextmanager
def named_model(name: str | os.PathLike | None, what: str, key: str) -> Iterator[None]:
    """Turn a failure to fetch `name` into a `ModelNotFoundError`. Errors from a local directory that exists
    (a broken or incomplete model) pass through unchanged: they are about its content, not about finding it."""
    try:
        yield
    except ModelNotFoundError:
        raise
    except (OSError, ValueError) as exc:  # huggingface_hub's HFValidationError is a ValueError
        if name is None or Path(os.fspath(name)).expanduser().is_dir():
            raise
        raise ModelNotFoundError(not_found_message(os.fspath(name), what, key, exc)) from exc


@contextmanager
def friendly_errors() -> Iterator[None]:
    """At an entry point: a `ModelNotFoundError` prints its message alone and exits with status 1, unless
    HYDRA_FULL_ERROR=1 asks for the traceback."""
    try:
        yield
    except ModelNotFoundError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
