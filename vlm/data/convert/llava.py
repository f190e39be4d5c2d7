"""LLaVA's instruction JSON + its image folder -> conversation shards for `sft` (and `align`'s 558k captions).

Input entries: `{"id", "image"?: "coco/train2017/x.jpg" | [several], "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}`. Turn texts are copied verbatim, so an `<image>`
tag stays where it was (before or after the text, or in a later turn). Entries without `image` become text-only
samples. One image is stored as `{key}.{ext}`, several as `{key}.0.{ext}`, `{key}.1.{ext}`, ...; the json's
`images` lists those field names in order, which is how the `conversation` format finds them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vlm.data.convert.writer import ROW_ERRORS, ShardWriter, Skip, Stats, image_bytes, image_path, progress
from vlm.data.formats import ROLE_ALIASES
from vlm.data.tokens import IMAGE_TOKEN


def load_entries(path: Path) -> list[Any]:
    """A JSON list (LLaVA's files) or JSONL."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
    return data


def check_conversation(turns: Any) -> list[dict[str, str]]:
    """The turns as they are, after checking roles and texts; `Skip` with the reason otherwise."""
    if not isinstance(turns, list) or not turns:
        raise Skip("missing_conversation")
    for turn in turns:
        if not isinstance(turn, dict):
            raise Skip("bad_conversation", f"turn is {type(turn).__name__}")
        role = ROLE_ALIASES.get(str(turn.get("from", turn.get("role", ""))).lower())
        value = turn.get("value", turn.get("content"))
        if role is None or not isinstance(value, str):
            raise Skip("bad_conversation", f"turn {turn!r:.80}")
    if not any(ROLE_ALIASES.get(str(t.get("from", t.get("role", ""))).lower()) == "assistant"
               and str(t.get("value", t.get("content", ""))).strip() for t in turns):
        raise Skip("no_assistant_turn")
    return turns


def _sample(entry: Any, images: Path, allow_outside: bool = False) -> dict[str, bytes]:
    if not isinstance(entry, dict):
        raise Skip("bad_entry", f"{type(entry).__name__}")
    turns = check_conversation(entry.get("conversations"))
    names = entry.get("image")
    paths = [] if names in (None, "", []) else [names] if isinstance(names, str) else names
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise Skip("bad_entry", f"image field {names!r:.80}")
    tags = sum(str(t.get("value", t.get("content", ""))).count(IMAGE_TOKEN) for t in turns)
    if tags > len(paths):
        raise Skip("too_many_image_tags", f"{tags} tags, {len(paths)} images")
    if 0 < tags < len(paths):
        raise Skip("too_few_image_tags", f"{tags} tags, {len(paths)} images")
    fields: dict[str, bytes] = {}
    field_names = []
    for n, rel in enumerate(paths):
        ext, data = image_bytes(image_path(images, rel, allow_outside))
        name = ext if len(paths) == 1 else f"{n}.{ext}"
        fields[name] = data
        field_names.append(name)
    meta = {"id": entry.get("id"), "conversations": turns, "images": field_names, "image_files": paths}
    fields["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return fields


def convert_llava(
    json_path: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    prefix: str = "train",
    samples_per_shard: int = 1000,
    quiet: bool = False,
    allow_outside: bool = False,
) -> Stats:
    """Write the shards; returns the counts (also saved as `{prefix}.stats.json`). Entries of any shape are
    skipped and counted; image paths must stay inside `images` unless `allow_outside`."""
    json_path, images = Path(json_path), Path(images)
    if not json_path.is_file():
        raise FileNotFoundError(f"LLaVA json {json_path} does not exist")
    entries = load_entries(json_path)
    stats = Stats("llava")
    text_only = multi = 0
    with ShardWriter(out, prefix, samples_per_shard) as writer, progress(len(entries), "llava", quiet) as bar:
        for index, entry in enumerate(entries):
            bar.update(1)
            ident = entry.get("id", index) if isinstance(entry, dict) else index
            try:
                fields = _sample(entry, images, allow_outside)
            except Skip as skip:
                stats.skip(skip.reason, f"id {ident}: {skip.detail}")
                continue
            except ROW_ERRORS as exc:
                stats.skip("bad_entry", f"id {ident}: {type(exc).__name__}: {exc}")
                continue
            n_images = len(fields) - 1
            text_only += n_images == 0
            multi += n_images > 1
            writer.write(f"{index:09d}", fields)
            stats.written += 1
            bar.set_postfix(written=stats.written, skipped=sum(stats.skipped.values()), refresh=False)
    stats.save(Path(out) / f"{prefix}.stats.json", shards=writer.shards, text_only=text_only, multi_image=multi)
    listing = Path(out) / f"{prefix}.txt"
    print(stats.line(f"{len(writer.shards)} shard(s), list {listing}; {text_only} text-only, {multi} multi-image"))
    return stats
