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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import jinja2
import webdataset as wds
from PIL import Image
from webdataset.filters import _shuffle as _wds_shuffle
from webdataset.shardlists import expand_urls as _wds_expand
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

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


# What bad data raises (PIL's decode errors are OSErrors; broken JSON or text, ValueErrors): skipped and counted.
# Anything else (TypeError, AttributeError, ...) is a bug in code, and re-raised rather than hidden as skips.
# A chat template's own `raise_exception` (e.g. roles that do not alternate) is a TemplateError: bad data too.
DATA_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, EOFError, Image.DecompressionBombError, jinja2.TemplateError,
)


class _CountingHandler:
    """Picklable handler: SkipSample counts under its reason, too-long samples as `too_long`, other data errors
    under the default reason; exceptions that are not data errors propagate."""

    def __init__(self, counter: SkipCounter, default_reason: str):
        self.counter = counter
        self.default_reason = default_reason

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, SkipSample):
            self.counter.add(exn.reason, exn.detail)
        elif isinstance(exn, TruncationError):
            self.counter.add("too_long", str(exn))
        elif isinstance(exn, DATA_ERRORS):
            self.counter.add(self.default_reason, f"{type(exn).__name__}: {exn}")
        else:
            raise exn
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
        if not found:
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
            if offset == 0 or long_name is not None or pax is not None or 0 < len(header) < 512:
                raise _Irregular("empty, truncated or ends inside an entry")
            return  # end of archive (or of the file) after a member, as tarfile stops there
        _check_numeric(header)
        if _octal(header, 148, 156) != sum(header) - sum(header[148:156]) + 256:
            raise _Irregular("checksum")
        size, kind, name = _octal(header, 124, 136), header[156:157], _nts(header[:100])
        offset += 512
        if kind in (b"x", b"L"):
            data = stream.read(size + (-size % 512))
            if len(data) < size + (-size % 512) or long_name is not None or pax is not None:
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
            raise _Irregular("truncated member")
        offset += size + len(padding)
        if "/" not in name and name.startswith("__") and name.endswith("__"):
            continue
        if _SKIP_META.match(name):
            continue
        yield name, data


def tar_files(urls: Iterable[str], handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """webdataset's `tar_file_expander(url_opener(...))` (file dicts, `{}` after each shard), several times faster
    for local shards: their headers are parsed here instead of by Python's `tarfile` (which spent ~25 us per
    member). Anything the parser does not handle plainly (compressed or unreadable shards, sparse members, a bad
    header, a truncated file) hands the shard to webdataset from its start, skipping the files already yielded,
    so the files and the exceptions the handler sees are webdataset's in every case."""
    for url in urls:
        done = 0
        if _plain_path(url):
            try:
                with open(url, "rb") as stream:
                    for name, data in _read_members(stream):
                        yield {"fname": name, "data": data, "__url__": url}
                        done += 1
                yield {}
                continue
            except (_Irregular, OSError):
                pass
        files = tar_file_expander(url_opener([{"url": url}], handler=handler), handler=handler)
        yield from itertools.islice(files, done, None)


def _plain_path(url: str) -> bool:
    """A local file webdataset would open as it is (no scheme, no URL rewriting)."""
    return ("://" not in url and not url.startswith(("pipe:", "file:")) and url != "-"
            and not os.environ.get("GOPEN_REWRITE"))


def raw_samples(
    urls: Iterable[str],
    counter: SkipCounter,
    shuffle_buffer: int = 0,
    rng: random.Random | None = None,
) -> Iterator[dict[str, Any]]:
    """Tar samples (raw bytes per field) from a stream of shard URLs, through a seeded shuffle buffer.

    Unreadable shards and tar members are counted as `read_error` and skipped.
    """
    handler = counter.handler("read_error")
    samples = group_by_keys(tar_files(urls, handler), handler=handler)
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
