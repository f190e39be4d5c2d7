"""Shard lists: which tar files a stage reads, and which of them a rank and worker read.

`expand_shards` turns a brace/glob pattern, a list of them or a `.txt` list file into URLs, checking local files at
once (a wrong path fails at construction, naming the pattern, not as an empty stream in a worker). A `Source` is one
data source of a stage; `shard_assignment` splits an epoch's shards by node then by worker, `resample_shards` draws
them with replacement for an endless stream.
"""
from __future__ import annotations

import glob
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from webdataset.shardlists import expand_urls as _wds_expand

log = logging.getLogger(__name__)


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


def plain_path(url: str) -> bool:
    """A local file webdataset would open as it is (no scheme, no URL rewriting)."""
    return ("://" not in url and not url.startswith(("pipe:", "file:")) and url != "-"
            and not os.environ.get("GOPEN_REWRITE"))


def resample_shards(urls: list[str], rng: random.Random, failed: set[str]) -> Iterator[str]:
    """Shards drawn with replacement, except those in `failed` (filled while reading); ends when all have failed.
    While none has failed, the draws are `rng.choice(urls)`, as before failures were tracked."""
    while True:
        live = [u for u in urls if u not in failed] if failed else urls
        if not live:
            log.error("every shard of this stream failed to read: %s%s", ", ".join(urls[:3]),
                      " ..." if len(urls) > 3 else "")
            return
        yield rng.choice(live)
