"""A folder of images plus a CSV or JSONL of (file name, caption) -> caption shards (`{key}.{ext}`, `.txt`, `.json`),
the layout img2dataset writes, so the `caption` format reads them for `clip` and `align`."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from vlm.data.convert.writer import ROW_ERRORS, ShardWriter, Skip, Stats, image_bytes, image_path, progress

FILE_COLUMNS = ("file_name", "filename", "file", "image", "path", "image_path")
CAPTION_COLUMNS = ("caption", "text", "txt", "description")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a `.csv` / `.tsv` (header line) or `.jsonl` (one object a line) file."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    row = {"__error__": f"line {n}: {exc}"}
                rows.append(row if isinstance(row, dict) else {"__error__": f"line {n}: not an object"})
        return rows
    raise ValueError(f"captions file {path} must be .csv, .tsv or .jsonl")


def _column(rows: list[dict[str, Any]], wanted: str | None, candidates: tuple[str, ...], what: str) -> str:
    names = list(dict.fromkeys(k for row in rows[:100] for k in row))
    if wanted:
        if wanted not in names:
            raise ValueError(f"no {what} column {wanted!r}; columns are {names}")
        return wanted
    for name in candidates:
        if name in names:
            return name
    raise ValueError(f"cannot tell the {what} column among {names}; pass --{what}-column")


def convert_images(
    images: str | os.PathLike,
    captions: str | os.PathLike,
    out: str | os.PathLike,
    prefix: str = "train",
    samples_per_shard: int = 1000,
    file_column: str | None = None,
    caption_column: str | None = None,
    quiet: bool = False,
    allow_outside: bool = False,
) -> Stats:
    """Write the shards; returns the counts (also saved as `{prefix}.stats.json` beside the shard list)."""
    images, captions = Path(images), Path(captions)
    if not images.is_dir():
        raise FileNotFoundError(f"image folder {images} does not exist")
    rows = read_rows(captions)
    stats = Stats("images")
    if not rows:
        raise ValueError(f"{captions} has no rows")
    file_col = _column(rows, file_column, FILE_COLUMNS, "file")
    caption_col = _column(rows, caption_column, CAPTION_COLUMNS, "caption")
    with ShardWriter(out, prefix, samples_per_shard) as writer, progress(len(rows), "images", quiet) as bar:
        for index, row in enumerate(rows):
            bar.update(1)
            try:
                fields = _sample(row, images, file_col, caption_col, allow_outside)
            except Skip as skip:
                stats.skip(skip.reason, f"row {index}: {skip.detail}")
                continue
            except ROW_ERRORS as exc:
                stats.skip("bad_row", f"row {index}: {type(exc).__name__}: {exc}")
                continue
            writer.write(f"{index:09d}", fields)
            stats.written += 1
            bar.set_postfix(written=stats.written, skipped=sum(stats.skipped.values()), refresh=False)
    listing = Path(out) / f"{prefix}.txt"
    stats.save(Path(out) / f"{prefix}.stats.json", shards=writer.shards)
    print(stats.line(f"{len(writer.shards)} shard(s), list {listing}"))
    return stats


def _sample(row: dict[str, Any], images: Path, file_col: str, caption_col: str,
            allow_outside: bool = False) -> dict[str, bytes]:
    if "__error__" in row:
        raise Skip("bad_row", row["__error__"])
    name = row.get(file_col)
    if not isinstance(name, str) or not name.strip():
        raise Skip("missing_image", "no file name")
    caption = row.get(caption_col)
    if not isinstance(caption, str) or not caption.strip():
        raise Skip("missing_caption", name)
    ext, data = image_bytes(image_path(images, name.strip(), allow_outside))
    meta = {k: v for k, v in row.items() if k not in (file_col, caption_col)}
    meta.update(file_name=name.strip(), caption=caption.strip())
    return {ext: data, "txt": caption.strip().encode("utf-8"), "json": json.dumps(meta).encode("utf-8")}

