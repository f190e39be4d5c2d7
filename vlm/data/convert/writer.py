"""What every converter shares: a rolling shard writer with reproducible tar metadata, and written/skipped counts."""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from vlm.data.formats import IMAGE_EXTENSIONS


class Skip(Exception):
    """A row that cannot be converted; `reason` is counted in the summary."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def image_path(root: Path, name: str, allow_outside: bool = False) -> Path:
    """`root / name`, which must resolve inside `root` (no absolute paths or `../` out of it, no links leading out)
    unless `allow_outside`: a converter copies only the images it was pointed at."""
    path = root / name
    if not allow_outside and not path.resolve().is_relative_to(root.resolve()):
        raise Skip("outside_images", f"{name} is outside {root} (pass allow_outside=true to copy it anyway)")
    return path


def image_bytes(path: Path) -> tuple[str, bytes]:
    """(extension, bytes) of an image file after a full decode check; `Skip` with the reason otherwise."""
    ext = path.suffix.lower().lstrip(".")
    if ext not in IMAGE_EXTENSIONS:
        raise Skip("unsupported_image", str(path))
    if not path.is_file():
        raise Skip("missing_image", str(path))
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as exc:  # truncated or not an image at all
        raise Skip("corrupt_image", f"{path}: {type(exc).__name__}: {exc}") from exc
    return ("jpg" if ext == "jpeg" else ext), data


class ShardWriter:
    """`{prefix}-{n:06d}.tar` shards of `samples_per_shard` samples; fixed mtime/mode, so equal input gives
    byte-identical shards. `close()` writes the `{prefix}.txt` shard list."""

    def __init__(self, out: str | os.PathLike, prefix: str = "train", samples_per_shard: int = 1000):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be at least 1")
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = int(samples_per_shard)
        self.shards: list[str] = []
        self.count = 0
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} may not contain '.' or '/'")
        if self._tar is None or self._in_shard >= self.samples_per_shard:
            self._roll()
        assert self._tar is not None
        for name, data in fields.items():
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._in_shard += 1
        self.count += 1

    def _roll(self) -> None:
        if self._tar is not None:
            self._tar.close()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tar = tarfile.open(self.out / name, "w", format=tarfile.USTAR_FORMAT)
        self.shards.append(name)
        self._in_shard = 0

    def close(self) -> Path:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        listing = self.out / f"{self.prefix}.txt"
        tmp = listing.with_name(listing.name + ".tmp")
        tmp.write_text("".join(name + "\n" for name in self.shards))
        tmp.replace(listing)
        return listing

    def abort(self) -> None:
        """A conversion that failed: the shard being written is removed and no list file is written, so no list
        ever names an incomplete shard (the completed shards stay on disk, unlisted)."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            if self.shards:
                (self.out / self.shards.pop()).unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# Errors a row of an unexpected shape raises inside a converter (a number where a list belongs, ...): counted as
# `bad_entry`, like a row that fails a check.
ROW_ERRORS = (TypeError, AttributeError, KeyError, ValueError, IndexError)


class Stats:
    """Samples written and skipped per reason; `line()` is the summary a converter prints last."""

    def __init__(self, name: str):
        self.name = name
        self.written = 0
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def skip(self, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, detail)

    def as_dict(self) -> dict[str, Any]:
        return {"written": self.written, "skipped": dict(sorted(self.skipped.items())),
                "first_skipped": dict(sorted(self.examples.items()))}

    def line(self, where: str = "") -> str:
        total = sum(self.skipped.values())
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items()))
        text = f"{self.name}: written {self.written}, skipped {total}" + (f" ({reasons})" if reasons else "")
        return text + (f" -> {where}" if where else "")

    def save(self, path: Path, **extra: Any) -> None:
        path.write_text(json.dumps({**self.as_dict(), **extra}, indent=2) + "\n")


def progress(total: int | None, desc: str, quiet: bool = False):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=quiet, dynamic_ncols=True)
