"""Preference data -> `preference` shards for the dpo stage, from TRL's conversational format or RLAIF-V's columns.

Input rows come from a JSON list or JSONL file. Images are paths relative to `images=` (or `{"path": ...}`, or
`{"bytes": base64}` as an exported Hugging Face image column).
- `trl`: `prompt` (a list of turns whose content is a string or a list of parts, `{"type": "image"}` and
  `{"type": "text", "text": ...}`; or a plain string), `chosen` and `rejected` (an assistant turn list or a string),
  `images` (a list) or `image` (one).
- `rlaif-v`: `image`, `question`, `chosen`, `rejected` (strings); the image goes before the question.

Written per pair: the images (`{key}.{ext}`, or `{key}.0.{ext}`, ... for several) and a json with `prompt` (turns
with `<image>` tags), `chosen`, `rejected` and `images` (field names in order). Bad pairs are skipped and counted:
identical or missing replies, a missing prompt, missing or broken images, more `<image>` tags than images.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import os
from pathlib import Path
from typing import Any

from PIL import Image

from vlm.data.convert.llava import load_entries
from vlm.data.convert.writer import ShardWriter, Skip, Stats, image_bytes, image_path, progress
from vlm.data.formats import ROLE_ALIASES
from vlm.data.tokens import IMAGE_TOKEN

SOURCES = ("trl", "rlaif-v")


def _content(value: Any) -> str:
    """A turn's content as text: a string, or TRL's parts with `{"type": "image"}` as an `<image>` tag."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise Skip("bad_prompt", f"content {value!r:.60}")
    parts = []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            parts.append(IMAGE_TOKEN)
        elif kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        else:
            raise Skip("bad_prompt", f"content part {part!r:.60}")
    return "\n".join(parts)


def _turns(value: Any) -> list[dict[str, str]]:
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise Skip("missing_prompt")
    turns = []
    for turn in value:
        role = ROLE_ALIASES.get(str(turn.get("role", turn.get("from", ""))).lower()) if isinstance(turn, dict) else None
        if role is None:
            raise Skip("bad_prompt", f"turn {turn!r:.60}")
        turns.append({"role": role, "content": _content(turn.get("content", turn.get("value")))})
    if turns[-1]["role"] != "user":
        raise Skip("bad_prompt", "the prompt must end with a user turn")
    return turns


def _reply(value: Any, which: str) -> str:
    if isinstance(value, list):
        if len(value) != 1:
            raise Skip("missing_reply" if not value else "multi_turn_reply", which)
        value = value[0]
    if isinstance(value, dict):
        value = _content(value.get("content", value.get("value")))
    if not isinstance(value, str) or not value.strip():
        raise Skip("missing_reply", which)
    return value


def _image(value: Any, images: Path, allow_outside: bool = False) -> tuple[str, bytes]:
    if isinstance(value, dict) and value.get("bytes"):
        try:
            data = base64.b64decode(value["bytes"], validate=True)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                ext = (image.format or "png").lower()
        except (binascii.Error, ValueError, OSError) as exc:
            raise Skip("corrupt_image", f"{type(exc).__name__}: {exc}") from exc
        return ("jpg" if ext == "jpeg" else ext), data
    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, str) or not path:
        raise Skip("missing_image", f"{value!r:.60}")
    return image_bytes(image_path(images, path, allow_outside))


def _pair(row: Any, source: str) -> tuple[list[dict[str, str]], str, str, list[Any]]:
    """(prompt turns, chosen, rejected, image values) of one input row."""
    if not isinstance(row, dict):
        raise Skip("bad_entry", type(row).__name__)
    chosen, rejected = _reply(row.get("chosen"), "chosen"), _reply(row.get("rejected"), "rejected")
    if chosen.strip() == rejected.strip():
        raise Skip("identical_replies")
    if source == "trl":
        prompt = _turns(row.get("prompt"))
        value = row.get("images", row.get("image"))
        images = [] if value in (None, "", []) else value if isinstance(value, list) else [value]
    else:
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise Skip("missing_prompt")
        if row.get("image") in (None, ""):
            raise Skip("missing_image", "no image")
        prompt = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}]
        images = [row["image"]]
    return prompt, chosen, rejected, images


def convert_preference(
    source: str,
    input_path: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    prefix: str = "train",
    samples_per_shard: int = 1000,
    quiet: bool = False,
    allow_outside: bool = False,
) -> Stats:
    """Write the shards; returns the counts (also saved as `{prefix}.stats.json`). Image paths must stay inside
    `images` unless `allow_outside`."""
    if source not in SOURCES:
        raise ValueError(f"unknown preference source {source!r}; expected one of {SOURCES}")
    input_path, images = Path(input_path), Path(images)
    if not input_path.is_file():
        raise FileNotFoundError(f"preference data {input_path} does not exist")
    rows = load_entries(input_path)
    stats = Stats(f"preference ({source})")
    with ShardWriter(out, prefix, samples_per_shard) as writer, progress(len(rows), "preference", quiet) as bar:
        for index, row in enumerate(rows):
            bar.update(1)
            try:
                prompt, chosen, rejected, values = _pair(row, source)
                tags = sum(t["content"].count(IMAGE_TOKEN) for t in prompt)
                if tags > len(values):
                    raise Skip("too_many_image_tags", f"{tags} tags, {len(values)} images")
                if 0 < tags < len(values):
                    raise Skip("too_few_image_tags", f"{tags} tags, {len(values)} images")
                fields: dict[str, bytes] = {}
                for n, value in enumerate(values):
                    ext, data = _image(value, images, allow_outside)
                    fields[ext if len(values) == 1 else f"{n}.{ext}"] = data
            except Skip as skip:
                ident = row.get("id", row.get("idx", index)) if isinstance(row, dict) else index
                stats.skip(skip.reason, f"row {ident}: {skip.detail}")
                continue
            meta = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "images": list(fields)}
            if isinstance(row, dict) and row.get("id", row.get("idx")) is not None:
                meta["id"] = row.get("id", row.get("idx"))
            fields["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
            writer.write(f"{index:09d}", fields)
            stats.written += 1
    stats.save(Path(out) / f"{prefix}.stats.json", shards=writer.shards, source=source)
    print(stats.line(f"{len(writer.shards)} shard(s), list {Path(out) / f'{prefix}.txt'}"))
    return stats
