"""Where evaluation items come from: webdataset shards or JSONL files (questions, or another model's predictions).

Both readers yield plain dicts and leave the task-specific fields alone; each task turns them into its items.
Images in a JSONL file are paths relative to that file; they are resolved here and opened only when needed
(`load_image`), so a large question file does not hold every picture in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """One dict per non-empty line; a relative `image` path is made relative to the file's directory."""
    for _, row in read_jsonl_lines(path):
        yield row


def read_jsonl_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, dict) per non-empty line; a line that is not UTF-8 or not a JSON object is a `ValueError`
    naming the file and line."""
    path = Path(path)
    root = path.resolve().parent
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{number}: not UTF-8 text (byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: not a JSON object (a {type(row).__name__})")
            image = row.get("image")
            if isinstance(image, str) and image:
                row["image"] = str(root / image)
            yield number, row


def read_shards(urls: str | Sequence[str]) -> Iterator[dict[str, Any]]:
    """Decoded samples in shard order (`__key__`, `json`, `txt`, and `image` as a PIL image when present)."""
    from vlm.data.tar import iterate_samples

    for sample in iterate_samples(urls):
        sample["image"] = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        yield sample


def is_jsonl(data: Any) -> bool:
    return isinstance(data, (str, Path)) and str(data).endswith(".jsonl")


def load_image(image: Image.Image | str | None) -> Image.Image | None:
    """A PIL image from an image or a path (None stays None). Pillow's decompression-bomb check stays on."""
    if image is None or isinstance(image, Image.Image):
        return image
    with Image.open(image) as opened:
        return opened.convert("RGB")


def reference_list(row: dict[str, Any], keys: Sequence[str] = ("answers", "references", "answer")) -> list[str]:
    """The reference answers of a row: a string or a list of strings or of VQA-style {"answer": ...} dicts."""
    value = next((row[k] for k in keys if row.get(k) is not None), None)
    if value is None:
        raise ValueError(f"item {row.get('id')!r} has no reference answer (looked for {', '.join(keys)})")
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError(f"item {row.get('id')!r}: the reference answers must be a string or a list, not "
                         f"{type(value).__name__}")
    return [v["answer"] if isinstance(v, dict) else str(v) for v in value]
