"""Tar reading: the files of local shards by our own header parser, everything else by webdataset; samples grouped
by key, through a seeded shuffle buffer of raw bytes; one ordered, decoded pass for evaluation.

`tar_files` yields what webdataset's `tar_file_expander(url_opener(...))` yields (file dicts, `{}` after each
shard), but parses the headers of plain local tars itself (`tarfile` spent ~25 us per member, and webdataset's
stream reading more; `benchmarks/README.md` has the end-to-end figures behind keeping it). Anything irregular is
handed to webdataset from the shard's start, so samples and skips are the same either way.
"""
from __future__ import annotations

import itertools
import logging
import random
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from webdataset.filters import _shuffle as _wds_shuffle
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander, url_opener

from vlm.data.formats import SkipSample, decode_sample, to_record
from vlm.data.shards import expand_shards, plain_path
from vlm.data.skips import DATA_ERRORS, DEFAULT_MAX_CONSECUTIVE_SKIPS, SkipCounter, SkipRun

log = logging.getLogger(__name__)



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
    if plain_path(url):
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


# Reasons that say a sample is not in the format asked for (rather than broken): see `check_format`.
FORMAT_REASONS = ("missing_caption", "missing_text", "missing_json", "missing_conversation", "missing_image")


def check_format(urls: Sequence[str], format: str, caption_field: str = "caption", samples: int = 16,
                 shards: int = 3, name: str = "train") -> None:
    """At start-up, from the first samples of the first local shards: raise when not one of them can be read in
    `format` (nor in the other image format, `vlm.data.formats.ALTERNATIVE`) and every one failed for a format
    reason - a mismatch that would otherwise skip the whole stream. Unreadable shards and broken samples are left
    to the stream, which counts them."""
    local = [u for u in urls if plain_path(u)][:shards]
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
