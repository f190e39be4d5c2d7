"""Counted, never fatal skips: why a sample was dropped, counted per reason across DataLoader workers, and a guard
that stops a stream skipping everything with an error that names the reasons and what to do.

What bad data raises is skipped and counted (`DATA_ERRORS`, `SkipSample`, a too-long sample); anything else is a bug
in code and propagates. The counts live in shared memory, so the main process sees every worker's skips.
"""
from __future__ import annotations

import logging
import multiprocessing
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import jinja2
from PIL import Image

from vlm.data.formats import SkipSample
from vlm.data.processor import TruncationError

log = logging.getLogger(__name__)

SKIP_REASONS = (
    "corrupt_image",
    "missing_text",
    "missing_caption",
    "missing_image",
    "missing_json",
    "missing_conversation",
    "bad_conversation",
    "bad_json",
    "no_assistant_turn",
    "no_user_turn",
    "too_many_image_tags",
    "too_few_image_tags",
    "too_long",
    "read_error",
    "processing_error",
    "other",
)
_WARN_FIRST = 3  # per reason and process: enough to see what goes wrong without flooding the log


class SkipCounter:
    """Per-reason skip counts in a shared-memory array (one slot per reason in `SKIP_REASONS`).

    Created in the main process before the DataLoader starts its workers, it is inherited by them (fork) or
    passed at their start (spawn), so `counts()` in the main process sums every worker's skips.
    """

    def __init__(self, warn: bool = True) -> None:
        self._array = multiprocessing.Array("q", len(SKIP_REASONS))
        self._warned: dict[str, int] = {}
        self._warn_first = _WARN_FIRST if warn else 0

    def add(self, reason: str, detail: str = "") -> str:
        """Count one skip; returns the slot it was counted under."""
        slot = reason if reason in SKIP_REASONS else "other"
        with self._array.get_lock():
            self._array[SKIP_REASONS.index(slot)] += 1
        seen = self._warned.get(reason, 0)
        if seen < getattr(self, "_warn_first", _WARN_FIRST):
            self._warned[reason] = seen + 1
            log.warning("skipping sample (%s)%s", reason, f": {detail}" if detail else "")
        return slot

    def handler(self, default_reason: str, run: SkipRun | None = None) -> Callable[[Exception], bool]:
        """A webdataset exception handler that counts the exception and continues (`run`: also tell that stream's
        guard, which stops a stream that skips everything)."""
        return CountingHandler(self, default_reason, run)

    def counts(self) -> dict[str, int]:
        """Nonzero counts by reason."""
        with self._array.get_lock():
            values = list(self._array)
        return {reason: n for reason, n in zip(SKIP_REASONS, values) if n}

    def __getstate__(self) -> dict[str, Any]:
        return {"_array": self._array}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._array = state["_array"]
        self._warned = {}


# What bad data raises (PIL's decode errors are OSErrors; broken JSON or text, ValueErrors; an unreadable, empty or
# cut-off shard, tarfile's ReadError, EOFError or zlib.error): skipped and counted. Anything else (TypeError,
# AttributeError, ...) is a bug in code, and re-raised rather than hidden as skips. A chat template's own
# `raise_exception` (e.g. roles that do not alternate) is a TemplateError: bad data too.
DATA_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, EOFError, Image.DecompressionBombError, jinja2.TemplateError, tarfile.TarError, zlib.error,
)


class CountingHandler:
    """Picklable handler: SkipSample counts under its reason, too-long samples as `too_long`, other data errors
    under the default reason; exceptions that are not data errors propagate."""

    def __init__(self, counter: SkipCounter, default_reason: str, run: SkipRun | None = None):
        self.counter = counter
        self.default_reason = default_reason
        self.run = run

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, SkipSample):
            slot = self.counter.add(exn.reason, exn.detail)
        elif isinstance(exn, TruncationError):
            slot = self.counter.add("too_long", str(exn))
        elif isinstance(exn, DATA_ERRORS):
            slot = self.counter.add(self.default_reason, f"{type(exn).__name__}: {exn}")
        else:
            raise exn
        if self.run is not None:
            self.run.skipped(slot)
        return True


DEFAULT_MAX_CONSECUTIVE_SKIPS = 4000

# What a stream that skips everything for one reason most likely means, and what to do about it.
SKIP_HINTS = {
    "missing_caption": "the samples have no .txt caption, no json `{caption_field}` and no json `conversations`: "
                       "set data.caption_field to the json field that holds the caption",
    "missing_text": "the samples have no .txt and no json `{caption_field}` (text stages read those): set "
                    "data.caption_field, or train a stage that reads images",
    "missing_json": "the samples have no .json with `conversations` and no caption: is this the data you meant?",
    "missing_conversation": "the samples' json has no `conversations` list and there is no caption: convert the "
                            "data with `python -m vlm.data.convert llava|images`",
    "missing_image": "the samples carry no image file (png, jpg, ...) or not the ones their json names",
    "corrupt_image": "the images do not decode: check the shards with `tar tvf`",
    "read_error": "the shards cannot be read as tar files (empty, cut off, or not tar): check data.train / data.val",
    "bad_json": "the .json files do not parse",
    "too_long": "every sample is longer than the processor's max_length: raise model.max_length or shorten the data",
    "bad_conversation": "the conversations' turns are not {{role|from, content|value}} objects",
}


class NoUsableSamples(RuntimeError):
    """A data stream skipped every one of many samples in a row: it would otherwise spin forever yielding nothing."""


class SkipRun:
    """The skips of one stream since its last usable sample; at `limit` in a row the stream stops with an error
    naming the reasons with counts and a hint. `used()` resets it. `pending` samples (read but not yet finished
    processing) hold the error back, since one of them may still be usable."""

    def __init__(self, limit: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS, what: str = "data",
                 caption_field: str = "caption") -> None:
        self.limit = int(limit) if limit else None
        self.what = what
        self.caption_field = caption_field
        self.reasons: Counter[str] = Counter()
        self.used_any = False
        self.pending = 0

    @property
    def consecutive(self) -> int:
        return sum(self.reasons.values())

    def used(self) -> None:
        self.reasons.clear()
        self.used_any = True

    def skipped(self, reason: str) -> None:
        self.reasons[reason] += 1
        if self.exceeded() and not self.pending:
            raise self.error()

    def exceeded(self) -> bool:
        return self.limit is not None and self.consecutive >= self.limit

    def describe(self) -> str:
        """`missing_caption 4000 — <hint>`: the reasons with counts, most frequent first, and a hint for the top one."""
        counts = ", ".join(f"{r} {n}" for r, n in self.reasons.most_common())
        hint = SKIP_HINTS.get(self.reasons.most_common(1)[0][0], "") if self.reasons else ""
        hint = hint.replace("{caption_field}", self.caption_field).replace("{{", "{").replace("}}", "}")
        return counts + (f" — {hint}" if hint else "")

    def error(self) -> NoUsableSamples:
        head = (f"all {self.consecutive} samples skipped" if not self.used_any
                else f"{self.consecutive} samples in a row skipped")
        return NoUsableSamples(f"{self.what}: {head}: {self.describe()} (the limit is "
                               f"data.max_consecutive_skips={self.limit})")
