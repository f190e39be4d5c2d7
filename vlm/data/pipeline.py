"""Webdataset streams: shard lists, seeded shuffling, worker/node splitting, and counted (never fatal) skips.

Order of stages: shards -> (node, worker split) -> tar samples -> shuffle buffer (raw bytes, cheap) -> decode with
PIL -> Record -> Processor. Any exception after reading a shard skips that sample or shard and increments a
per-reason counter in shared memory, so the counts from DataLoader workers are visible in the main process.
"""
from __future__ import annotations

import glob
import itertools
import logging
import multiprocessing
import os
import random
import re
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import jinja2
from PIL import Image
from webdataset.filters import _shuffle as _wds_shuffle
from webdataset.shardlists import expand_urls as _wds_expand
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander, url_opener

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

    def handler(self, default_reason: str, run: "SkipRun | None" = None) -> Callable[[Exception], bool]:
        """A webdataset exception handler that counts the exception and continues (`run`: also tell that stream's
        guard, which stops a stream that skips everything)."""
        return _CountingHandler(self, default_reason, run)

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


class _CountingHandler:
    """Picklable handler: SkipSample counts under its reason, too-long samples as `too_long`, other data errors
    under the default reason; exceptions that are not data errors propagate."""

    def __init__(self, counter: SkipCounter, default_reason: str, run: "SkipRun | None" = None):
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


def expand_shards(
    spec: str | os.PathLike | Sequence[str | os.PathLike], allow_missing: bool = False
) -> list[str]:
    """Shard URLs from a brace/glob pattern (or `::`-joined patterns), a list of them, or a `.txt` list file.

    Local patterns are checked now, so a wrong path fails at construction with the pattern in the message
    rather than as an empty stream inside a worker: a pattern that matches no file is an error, and so is a
    brace pattern or list entry naming a file that does not exist (the message names the first missing file),
    unless `allow_missing` (then the missing ones are dropped with a warning). Globs match what exists.
    `pipe:` and remote URLs pass through unchecked.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise ValueError("empty shard specification")
    urls: list[str] = []
    for item in specs:
        pattern = os.fspath(item)
        if _is_local(pattern) and pattern.endswith(".txt"):
            urls += expand_shards(_read_list_file(_local_path(pattern)), allow_missing)
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
        if not found and not (missing and allow_missing):  # (a list file's entries come here one by one)
            raise FileNotFoundError(f"no shard files match {pattern!r}")
        if missing and not allow_missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(missing) + len(found)} shards of {pattern!r} do not exist "
                f"(first missing: {missing[0]}); pass allow_missing_shards=true to train on the rest"
            )
        if missing:
            log.warning("%d of %d shards of %r do not exist (first: %s); using the rest",
                        len(missing), len(missing) + len(found), pattern, missing[0])
        urls += found
    if not urls:
        raise FileNotFoundError(f"none of the shards of {spec!r} exist")
    return urls


# ---------------------------------------------------------------- pipelines


class SampleFn:
    """Raw sample -> decoded -> Record -> processor output (picklable, so spawned workers can run it).

    `processor` passed to the call overrides the default one (another image size, see `vlm.data.resolution`).
    """

    def __init__(
        self,
        processor: Callable[[Any], dict[str, Any]] | None,
        format: str,
        caption_prompts: Sequence[str] | None = None,
        caption_field: str = "caption",
    ):
        self.processor = processor
        self.format = format
        self.caption_prompts = list(caption_prompts) if caption_prompts else None
        self.caption_field = caption_field

    def __call__(self, sample: dict[str, Any], processor: Callable[[Any], dict[str, Any]] | None = None) -> Any:
        decoded = decode_sample(sample, images=self.format != "text")
        record = to_record(decoded, self.format, self.caption_prompts, self.caption_field)
        return (processor or self.processor)(record)

    def prepare(self, sample: dict[str, Any], processor: Callable[[Any], dict[str, Any]] | None = None) -> Any:
        """The first half of the call, for processors that split theirs (`Processor.prepare` / `finish`): returns
        (processor, prepared), its `finish` still to run; other processors run whole: (None, result)."""
        decoded = decode_sample(sample, images=self.format != "text")
        record = to_record(decoded, self.format, self.caption_prompts, self.caption_field)
        processor = processor or self.processor
        if callable(getattr(processor, "prepare", None)) and callable(getattr(processor, "finish", None)):
            return processor, processor.prepare(record)
        return None, processor(record)


# Reasons that say a sample is not in the format asked for (rather than broken): see `check_format`.
FORMAT_REASONS = ("missing_caption", "missing_text", "missing_json", "missing_conversation", "missing_image")


def check_format(urls: Sequence[str], format: str, caption_field: str = "caption", samples: int = 16,
                 shards: int = 3, name: str = "train") -> None:
    """At start-up, from the first samples of the first local shards: raise when not one of them can be read in
    `format` (nor in the other image format, `vlm.data.formats.ALTERNATIVE`) and every one failed for a format
    reason - a mismatch that would otherwise skip the whole stream. Unreadable shards and broken samples are left
    to the stream, which counts them."""
    local = [u for u in urls if _plain_path(u)][:shards]
    if not local:
        return
    counter = SkipCounter(warn=False)  # the stream reports its own skips
    reasons: Counter[str] = Counter()
    for n, sample in enumerate(raw_samples(local, counter)):
        if n >= samples:
            break
        try:
            to_record(decode_sample(sample, images=format != "text"), format, None, caption_field)
            return
        except SkipSample as exc:
            reasons[exc.reason] += 1
        except DATA_ERRORS:
            return  # broken, not mismatched: the stream counts it
    if not reasons or set(reasons) - set(FORMAT_REASONS):
        return
    run = SkipRun(None, name, caption_field)
    run.reasons = reasons
    raise ValueError(f"data source {name!r}: none of its first {sum(reasons.values())} samples can be read as "
                     f"{format!r}: {run.describe()}")


# ---------------------------------------------------------------- sources and raw streams


@dataclass
class Source:
    """One data source of a stage: its shards, record format, mixing weight and shuffling.

    `shuffle_buffer` None = the DataModule's. The name seeds the source's own shard and sample shuffling.
    """

    name: str
    urls: list[str]
    format: str = "conversation"
    weight: float = 1.0
    caption_prompts: list[str] | None = None
    caption_field: str = "caption"
    shuffle_buffer: int | None = None
    val_urls: list[str] | None = None


def dist_info() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when initialised, else the RANK / WORLD_SIZE environment."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard_assignment(urls: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """Epoch mode: node split then worker split (strided), so no two (rank, worker) pairs share a shard."""
    return list(urls)[rank::world_size][worker::num_workers]


# ---------------------------------------------------------------- tar reading


class _Irregular(Exception):
    """Something in a tar file the fast reader leaves to `tarfile` (see `tar_files`)."""


class _Broken(_Irregular):
    """A tar file that is empty, cut off, or has a bad header after its first member: `tarfile` would end it
    silently there, so the fast reader reports it itself (and the sample it was reading is dropped)."""


_OCTAL = re.compile(rb" *[0-7]* *(?:\x00.*)?", re.S)  # a numeric header field as tarfile reads it (stricter)
_NUMERIC = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (148, 156), (329, 337), (337, 345))
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator default
_REGULAR, _SPECIAL = (b"0", b"\x00", b"7"), (b"1", b"2", b"3", b"4", b"5", b"6")


def _nts(field: bytes) -> str:
    end = field.find(b"\x00")
    return (field if end < 0 else field[:end]).decode(tarfile.ENCODING, "surrogateescape")


def _octal(header: bytes, start: int, end: int) -> int:
    value = header[start:end].split(b"\x00", 1)[0].strip()
    return int(value, 8) if value else 0


def _check_numeric(header: bytes) -> None:
    """Every numeric field tarfile parses is one it would accept (octal digits between spaces, up to a NUL)."""
    fields = header[100:156] + header[329:345]
    if fields.translate(None, b"01234567\x00") and not all(_OCTAL.fullmatch(header, a, b) for a, b in _NUMERIC):
        raise _Irregular("numeric field")  # (the common case, digits and NULs only, needs no regex)


def _pax(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        match = _PAX_RECORD.match(data, pos)
        if not match or int(match.group(1)) <= match.end() - pos:
            raise _Irregular("pax record")
        end = pos + int(match.group(1))
        if end > len(data) or data[end - 1] != 0x0A:
            raise _Irregular("pax record")
        try:
            records[match.group(2).decode("utf-8")] = data[match.end() : end - 1].decode("utf-8")
        except UnicodeDecodeError:
            raise _Irregular("pax encoding") from None
        pos = end
    if pos < len(data) and data[pos:].strip(b"\x00"):
        raise _Irregular("pax trailer")
    if "hdrcharset" in records or any(k.startswith("GNU.sparse") for k in records):
        raise _Irregular("pax sparse or charset")
    return records


def _read_members(stream: Any) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular members of an uncompressed tar stream that webdataset keeps, exactly as
    `tarfile` in stream mode and webdataset's `tar_file_iterator` give them; raises `_Irregular` at anything
    else (compression, sparse or global headers, a bad checksum, a truncated file, odd numeric fields)."""
    offset, long_name, pax = 0, None, None
    while True:
        header = stream.read(512)
        if len(header) < 512 or not header.strip(b"\x00"):
            if offset == 0 and not header:
                raise _Broken("empty file")
            if offset == 0 or long_name is not None or pax is not None or 0 < len(header) < 512:
                raise _Broken("truncated: the file ends inside a header or an entry")
            return  # end of archive (or of the file) after a member, as tarfile stops there
        try:
            _check_numeric(header)
            if _octal(header, 148, 156) != sum(header) - sum(header[148:156]) + 256:
                raise _Irregular("checksum")
        except _Irregular as exc:
            if offset:  # not at the start (where it may be a compressed tar): a corrupt header
                raise _Broken(f"bad header at byte {offset} ({exc})") from None
            raise
        size, kind, name = _octal(header, 124, 136), header[156:157], _nts(header[:100])
        offset += 512
        if kind in (b"x", b"L"):
            data = stream.read(size + (-size % 512))
            if len(data) < size + (-size % 512):
                raise _Broken("truncated: the file ends inside an extended header")
            if long_name is not None or pax is not None:
                raise _Irregular("extended header")
            offset += len(data)
            if kind == b"x":
                pax = _pax(data[:size])
            else:
                long_name = _nts(data[:size])
            continue
        if kind not in _REGULAR and kind not in _SPECIAL:
            raise _Irregular(f"member type {kind!r}")
        if kind == b"\x00" and name.endswith("/"):
            kind = b"5"
        if kind == b"5":
            name = name.rstrip("/")
        prefix = _nts(header[345:500])
        if prefix:
            name = prefix + "/" + name
        if long_name is not None:
            name, long_name = long_name, None
        if pax is not None:
            if "size" in pax:
                if not (pax["size"].isascii() and pax["size"].isdigit()):
                    raise _Irregular("pax size")
                size = int(pax["size"])
            if "path" in pax:
                name = pax["path"].rstrip("/")
            pax = None
        if kind in _SPECIAL:
            if size:
                raise _Irregular("special member with data")
            continue
        data = stream.read(size)
        padding = stream.read(-size % 512)
        if len(data) < size or len(padding) < -size % 512:
            raise _Broken(f"truncated: the file ends inside member {name!r}")
        offset += size + len(padding)
        if "/" not in name and name.startswith("__") and name.endswith("__"):
            continue
        if _SKIP_META.match(name):
            continue
        yield name, data


class ShardReadError(OSError):
    """A shard that could not be read to its end (counted as `read_error`; the message names the shard)."""


def _shard_files(url: str, handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """The regular files of one shard, through the fast reader when it is a plain local tar, else webdataset's
    `tar_file_expander(url_opener(...))` (errors go to `handler`). A shard the fast reader finds irregular but not
    broken (compressed, sparse members, ...) is handed to webdataset from its start, skipping the files already
    yielded; a broken one (empty, cut off, a corrupt header after the first member) is reported as broken."""
    done = 0
    if _plain_path(url):
        try:
            with open(url, "rb") as stream:
                for name, data in _read_members(stream):
                    yield {"fname": name, "data": data, "__url__": url}
                    done += 1
            return
        except _Broken as exc:
            handler(ShardReadError(f"shard {url}: {exc}"))
            return
        except (_Irregular, OSError):
            pass
    files = tar_file_expander(url_opener([{"url": url}], handler=handler), handler=handler, eof_value=None)
    yield from itertools.islice(files, done, None)


def tar_files(urls: Iterable[str], handler: Callable[[Exception], bool],
              failed: set[str] | None = None) -> Iterator[dict[str, Any]]:
    """webdataset's `tar_file_expander(url_opener(...))` (file dicts, `{}` after each shard), several times faster
    for local shards (their headers are parsed here instead of by Python's `tarfile`, which spent ~25 us per
    member), and strict about broken shards: every error is counted through `handler` (with the shard's name),
    and the sample being read when a shard broke is dropped rather than used half-complete (a sample's files are
    held back until the next sample starts or the shard ends cleanly). A shard that yields nothing but an error
    is added to `failed`, so a resampled stream does not draw it again."""
    for url in urls:
        held: list[dict[str, Any]] = []
        key, broken, read = None, [], 0

        def note(exn: Exception) -> bool:
            broken.append(exn)
            if not isinstance(exn, ShardReadError) and isinstance(exn, DATA_ERRORS):
                first = exn.args[0] if exn.args else ""
                exn = ShardReadError(f"shard {url}: {type(exn).__name__}: {first}")
            return handler(exn)

        for item in _shard_files(url, note):
            read += 1
            if broken:
                held, broken[:] = [], []  # the sample being read when the shard broke is incomplete
            name_key = base_plus_ext(item["fname"])[0]
            if name_key != key:
                yield from held
                held, key = [], name_key
            held.append(item)
        if not broken:
            yield from held
        elif not read and failed is not None:
            failed.add(url)
        yield {}


def _plain_path(url: str) -> bool:
    """A local file webdataset would open as it is (no scheme, no URL rewriting)."""
    return ("://" not in url and not url.startswith(("pipe:", "file:")) and url != "-"
            and not os.environ.get("GOPEN_REWRITE"))


def raw_samples(
    urls: Iterable[str],
    counter: SkipCounter,
    shuffle_buffer: int = 0,
    rng: random.Random | None = None,
    failed: set[str] | None = None,
    run: SkipRun | None = None,
) -> Iterator[dict[str, Any]]:
    """Tar samples (raw bytes per field) from a stream of shard URLs, through a seeded shuffle buffer.

    Unreadable shards and tar members are counted as `read_error` and skipped; shards that yield nothing but an
    error are added to `failed` (see `tar_files`); `run` is the stream's guard against skipping everything.
    """
    handler = counter.handler("read_error", run)
    samples = group_by_keys(tar_files(urls, handler, failed), handler=handler)
    if shuffle_buffer and shuffle_buffer > 1:
        samples = _wds_shuffle(iter(samples), shuffle_buffer, min(shuffle_buffer, 100), rng=rng or random.Random(0))
    return iter(samples)


def mix_samples(
    streams: Sequence[Iterator[dict[str, Any]]], weights: Sequence[float], rng: random.Random
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(source index, sample), each draw from source i with probability weight_i / sum of live weights.

    Seeded (unlike webdataset's RandomMix, which draws from the global `random`); a source that ends is dropped
    and the rest keep their relative weights. One source: no draws at all.
    """
    live = [i for i, w in enumerate(weights) if w > 0]
    if len(live) == 1:
        for sample in streams[live[0]]:
            yield live[0], sample
        return
    while live:
        i = rng.choices(live, weights=[weights[k] for k in live])[0]
        try:
            yield i, next(streams[i])
        except StopIteration:
            live.remove(i)


def iterate_samples(
    urls: str | Sequence[str], decode_images: bool = True, counter: SkipCounter | None = None,
    max_consecutive_skips: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS, allow_missing: bool = False,
) -> Iterator[dict[str, Any]]:
    """One ordered pass over the shards, yielding decoded dicts (PIL images, str txt, parsed json, __key__).

    For evaluation: no shuffling, no node or worker split. Broken shards and samples are skipped (and counted if a
    counter is given); `max_consecutive_skips` in a row stop the pass with `NoUsableSamples`.
    """
    counter = counter or SkipCounter()
    run = SkipRun(max_consecutive_skips, "evaluation data")
    raw = raw_samples(expand_shards(urls, allow_missing), counter, run=run)
    handler = counter.handler("processing_error", run)
    for sample in raw:
        try:
            decoded = decode_sample(sample, images=decode_images)
        except Exception as exc:  # counted per reason, never fatal (a bug in code is re-raised by the handler)
            handler(exc)
            continue
        run.used()
        yield decoded
