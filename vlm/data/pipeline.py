"""Webdataset streams: shard lists, seeded shuffling, worker/node splitting, and counted (never fatal) skips.

Order of stages: shards -> (node, worker split) -> tar samples -> shuffle buffer (raw bytes, cheap) -> decode with
PIL -> Record -> Processor. Any exception after reading a shard skips that sample or shard and increments a
per-reason counter in shared memory, so the counts from DataLoader workers are visible in the main process.
"""
from __future__ import annotations

import glob
import logging
import multiprocessing
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import webdataset as wds
from webdataset.shardlists import expand_urls as _wds_expand

from vlm.data.formats import SkipSample, decode_sample, to_record
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

    def __init__(self) -> None:
        self._array = multiprocessing.Array("q", len(SKIP_REASONS))
        self._warned: dict[str, int] = {}

    def add(self, reason: str, detail: str = "") -> None:
        slot = reason if reason in SKIP_REASONS else "other"
        with self._array.get_lock():
            self._array[SKIP_REASONS.index(slot)] += 1
        seen = self._warned.get(reason, 0)
        if seen < _WARN_FIRST:
            self._warned[reason] = seen + 1
            log.warning("skipping sample (%s)%s", reason, f": {detail}" if detail else "")

    def handler(self, default_reason: str) -> Callable[[Exception], bool]:
        """A webdataset exception handler that counts the exception and continues."""
        return _CountingHandler(self, default_reason)

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


class _CountingHandler:
    """Picklable handler: SkipSample counts under its reason, too-long samples as `too_long`, others as default."""

    def __init__(self, counter: SkipCounter, default_reason: str):
        self.counter = counter
        self.default_reason = default_reason

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, SkipSample):
            self.counter.add(exn.reason, exn.detail)
        elif isinstance(exn, TruncationError):
            self.counter.add("too_long", str(exn))
        else:
            self.counter.add(self.default_reason, f"{type(exn).__name__}: {exn}")
        return True


# ---------------------------------------------------------------- shard lists


def _is_local(url: str) -> bool:
    return url.startswith("file:") or ("://" not in url and not url.startswith("pipe:"))


def _local_path(url: str) -> str:
    for prefix in ("file://", "file:"):
        if url.startswith(prefix):
            return url[len(prefix) :]
    return url


def _read_list_file(path: str) -> list[str]:
    """Shard list file: one URL or pattern per line, `#` comments; relative paths are relative to the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"shard list file {path!r} does not exist")
    base = Path(path).parent
    entries = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if _is_local(line) and not line.startswith("file:") and not os.path.isabs(line):
            line = str(base / line)
        entries.append(line)
    return entries


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard URLs from a brace/glob pattern (or `::`-joined patterns), a list of them, or a `.txt` list file.

    Local patterns are checked now, so a wrong path fails at construction with the pattern in the message
    rather than as an empty stream inside a worker: a pattern that matches no file is an error, one that
    matches only some files keeps those with a warning. `pipe:` and remote URLs pass through unchecked.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise ValueError("empty shard specification")
    urls: list[str] = []
    for item in specs:
        pattern = os.fspath(item)
        if _is_local(pattern) and pattern.endswith(".txt"):
            urls += expand_shards(_read_list_file(_local_path(pattern)))
            continue
        found: list[str] = []
        missing: list[str] = []
        for url in _wds_expand(pattern):
            if not _is_local(url):
                found.append(url)
                continue
            path = _local_path(url)
            if glob.has_magic(path):
                found += sorted(glob.glob(path))
            elif os.path.exists(path):
                found.append(path)
            else:
                missing.append(path)
        if not found:
            raise FileNotFoundError(f"no shard files match {pattern!r}")
        if missing:
            log.warning("%d of %d shards of %r do not exist (first: %s); using the rest",
                        len(missing), len(missing) + len(found), pattern, missing[0])
        urls += found
    return urls


# ---------------------------------------------------------------- pipelines


class SampleFn:
    """Raw sample -> decoded -> Record -> processor output (picklable, so spawned workers can run it)."""

    def __init__(
        self, processor: Callable[[Any], dict[str, Any]], format: str, caption_prompts: Sequence[str] | None = None
    ):
        self.processor = processor
        self.format = format
        self.caption_prompts = list(caption_prompts) if caption_prompts else None

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        decoded = decode_sample(sample, images=self.format != "text")
        return self.processor(to_record(decoded, self.format, self.caption_prompts))


def make_pipeline(
    urls: Sequence[str],
    fn: Callable[[dict[str, Any]], Any],
    counter: SkipCounter,
    resampled: bool = True,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    shardshuffle: int | bool = 100,
) -> wds.DataPipeline:
    """The sample stream for one split.

    resampled: shards drawn with replacement forever from an RNG seeded by (seed, rank, worker, epoch), so
    every worker sees a different but reproducible stream. Otherwise one pass per epoch: shards shuffled
    (`shardshuffle` buffer, seed + epoch, the same order on every node) then split by node and by worker.
    The sample buffer shuffles raw bytes; decoding happens after it.
    """
    if resampled:
        stages: list[Any] = [wds.ResampledShards(list(urls), seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(list(urls))]
        if shardshuffle:
            size = 100 if shardshuffle is True else int(shardshuffle)
            stages.append(wds.detshuffle(size, initial=size, seed=seed))
        stages.append(wds.split_by_node)
        stages.append(wds.split_by_worker)
    stages.append(wds.tarfile_to_samples(handler=counter.handler("read_error")))
    if shuffle_buffer and shuffle_buffer > 1:
        stages.append(wds.detshuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed + 1))
    stages.append(wds.map(fn, handler=counter.handler("processing_error")))
    return wds.DataPipeline(*stages)


def iterate_samples(
    urls: str | Sequence[str], decode_images: bool = True, counter: SkipCounter | None = None
) -> Iterator[dict[str, Any]]:
    """One ordered pass over the shards, yielding decoded dicts (PIL images, str txt, parsed json, __key__).

    For evaluation: no shuffling, no node or worker split. Broken samples are skipped (and counted if a
    counter is given).
    """
    counter = counter or SkipCounter()
    stages = [
        wds.SimpleShardList(expand_shards(urls)),
        wds.tarfile_to_samples(handler=counter.handler("read_error")),
        wds.map(lambda s: decode_sample(s, images=decode_images), handler=counter.handler("processing_error")),
    ]
    yield from wds.DataPipeline(*stages)
