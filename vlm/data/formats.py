"""Decoded webdataset samples -> `Record`s, one converter per data `format` (text, caption, conversation).

Everything that makes a sample unusable raises `SkipSample(reason)`: the pipeline counts reasons and moves on,
so one bad sample in a billion never stops a run.
"""
from __future__ import annotations

import io
import json
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vlm.data.tokens import IMAGE_TOKEN

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm")
FORMATS = ("text", "caption", "conversation", "preference")

DEFAULT_CAPTION_PROMPTS = (
    "Describe the image.",
    "Write a short caption for this image.",
    "What is in the picture?",
    "Describe this image briefly.",
    "Give a one-sentence description of the image.",
)

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is a short snake_case tag the pipeline counts."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Record:
    """One training example, independent of the tokenizer: chat messages (or plain text) plus PIL images."""

    messages: list[dict[str, str]] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return str(self.meta.get("key", ""))


# ---------------------------------------------------------------- decoding


def decode_image(data: Any) -> Image.Image:
    """Bytes (or an already decoded image) -> fully loaded RGB PIL image; failure is `SkipSample("corrupt_image")`."""
    if isinstance(data, Image.Image):
        return data if data.mode == "RGB" else data.convert("RGB")
    try:
        image = Image.open(io.BytesIO(data))  # in memory: nothing to close once loaded
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        raise SkipSample("corrupt_image", f"{type(exc).__name__}: {exc}") from exc


def _is_image_field(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def decode_sample(sample: dict[str, Any], images: bool = True) -> dict[str, Any]:
    """Raw webdataset sample (bytes per field) -> txt as str, json as object, images as PIL (or dropped).

    `images=False` drops image fields unread, for text-only formats.
    """
    out: dict[str, Any] = {}
    for name, value in sample.items():
        if name.startswith("__"):
            out[name] = value
        elif _is_image_field(name):
            if images:
                out[name] = decode_image(value)
        elif name.endswith("txt"):
            out[name] = value.decode("utf-8") if isinstance(value, bytes) else value
        elif name.endswith("json"):
            try:
                out[name] = json.loads(value) if isinstance(value, (bytes, str)) else value
            except (ValueError, UnicodeDecodeError) as exc:
                raise SkipSample("bad_json", str(exc)) from exc
        else:
            out[name] = value
    return out


# ---------------------------------------------------------------- converters


def _meta(sample: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {"key": sample.get("__key__", "")}
    if "__url__" in sample:
        meta["url"] = sample["__url__"]
    if isinstance(sample.get("json"), dict):
        meta["json"] = sample["json"]
    return meta


def json_field(data: Any, field: str) -> Any:
    """`data["a"]["b"]` for field "a.b"; None when any step is missing."""
    for part in field.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def caption_text(sample: dict[str, Any], caption_field: str = "caption") -> str | None:
    """`txt` if it is non-empty, else the json's `caption_field` (dotted path; img2dataset writes "caption")."""
    text = sample.get("txt")
    if not (isinstance(text, str) and text.strip()):
        text = json_field(sample.get("json"), caption_field) if caption_field else None
    if isinstance(text, str) and text.strip():
        return text.strip()
    return None


def _default_image_field(sample: dict[str, Any]) -> str | None:
    names = sorted(n for n in sample if not n.startswith("__") and _is_image_field(n))
    return names[0] if names else None


def pick_prompt(key: str, prompts: Sequence[str]) -> str:
    """The same prompt for the same key in every run and process (crc32, not Python's salted `hash`)."""
    return prompts[zlib.crc32(key.encode("utf-8")) % len(prompts)]


def text_record(sample: dict[str, Any], caption_field: str = "caption", **_: Any) -> Record:
    """`txt` (or the json caption) as plain text for language-model training; images are ignored."""
    text = caption_text(sample, caption_field)
    if text is None:
        raise SkipSample("missing_text")
    return Record(text=text, meta=_meta(sample))


def caption_record(
    sample: dict[str, Any], caption_prompts: Sequence[str] | None = None, caption_field: str = "caption", **_: Any
) -> Record:
    """Image + caption -> `[user: "<image>\\n" + prompt, assistant: caption]`.

    The caption is `txt`, or the json's `caption_field`: img2dataset shards (`{key}.jpg`, `{key}.txt`,
    `{key}.json`) are read as they are.
    """
    caption = caption_text(sample, caption_field)
    if caption is None:
        raise SkipSample("missing_caption")
    name = _default_image_field(sample)
    if name is None:
        raise SkipSample("missing_image")
    key = str(sample.get("__key__", ""))
    prompt = pick_prompt(key, list(caption_prompts or DEFAULT_CAPTION_PROMPTS))
    messages = [
        {"role": "user", "content": f"{IMAGE_TOKEN}\n{prompt}"},
        {"role": "assistant", "content": caption},
    ]
    return Record(messages=messages, images=[decode_image(sample[name])], meta=_meta(sample))


def _messages(turns: Any) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise SkipSample("missing_conversation")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise SkipSample("bad_conversation", f"turn is {type(turn).__name__}")
        role = ROLE_ALIASES.get(str(turn.get("role", turn.get("from", ""))).lower())
        content = turn.get("content", turn.get("value"))
        if role is None or not isinstance(content, str):
            raise SkipSample("bad_conversation", f"turn {turn!r:.80}")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise SkipSample("no_assistant_turn")
    return messages


def conversation_record(sample: dict[str, Any], **_: Any) -> Record:
    """json `conversations` (role/content or LLaVA's from/value) + the images named in json `images`.

    `images` lists sample fields (extensions such as "png" or "1.jpg"); by default the sample's single image.
    Images without any `<image>` tag get one at the start of the first user turn (LLaVA's convention);
    more tags than images is an error.
    """
    data = sample.get("json")
    if not isinstance(data, dict):
        raise SkipSample("missing_json")
    messages = _messages(data.get("conversations"))
    if "images" in data and data["images"] is not None:
        names = data["images"]
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names):
            raise SkipSample("bad_json", f"`images` must be a list of the sample's image fields, not {names!r:.60}")
        names = [str(n) for n in names]
    else:
        default = _default_image_field(sample)
        names = [default] if default else []
    missing = [n for n in names if n not in sample]
    if missing:
        raise SkipSample("missing_image", ",".join(missing))
    images = [decode_image(sample[n]) for n in names]
    tags = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if tags == 0 and images:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise SkipSample("no_user_turn")
        first_user["content"] = IMAGE_TOKEN * len(images) + "\n" + first_user["content"]
    elif tags > len(images):
        raise SkipSample("too_many_image_tags", f"{tags} tags, {len(images)} images")
    elif tags < len(images):
        raise SkipSample("too_few_image_tags", f"{tags} tags, {len(images)} images")
    return Record(messages=messages, images=images, meta=_meta(sample))


def _reply(value: Any, which: str) -> str:
    """A preference reply: a string, or one assistant turn ({role|from, content|value}, alone or in a list)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if ROLE_ALIASES.get(str(value.get("role", value.get("from", "assistant"))).lower()) != "assistant":
            raise SkipSample("bad_reply", f"{which} is not an assistant turn")
        value = value.get("content", value.get("value"))
    if not isinstance(value, str) or not value.strip():
        raise SkipSample("missing_reply", which)
    return value


def preference_record(sample: dict[str, Any], **_: Any) -> Record:
    """json `prompt` (turns as in `conversation`, or one user string), `chosen` and `rejected` replies, and the
    images named in json `images` (as in `conversation`) -> the chosen conversation, the rejected reply in
    `meta["rejected"]`. Identical or missing replies, and more `<image>` tags than images, are skipped."""
    data = sample.get("json")
    if not isinstance(data, dict):
        raise SkipSample("missing_json")
    chosen, rejected = _reply(data.get("chosen"), "chosen"), _reply(data.get("rejected"), "rejected")
    if chosen.strip() == rejected.strip():
        raise SkipSample("identical_replies")
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise SkipSample("missing_prompt")
    turns = [*prompt, {"role": "assistant", "content": chosen}]
    record = conversation_record({**sample, "json": {**data, "conversations": turns}})
    if [m["role"] for m in record.messages[-2:]] != ["user", "assistant"]:
        raise SkipSample("bad_prompt", "the prompt must end with a user turn")
    record.meta["rejected"] = rejected
    return record


CONVERTERS: dict[str, Callable[..., Record]] = {
    "text": text_record,
    "caption": caption_record,
    "conversation": conversation_record,
    "preference": preference_record,
}


# A stage's format is its default, not a filter: a sample that is not in it (the reasons below) but is in the other
# image format is read in that one. LLaVA's stage-1 data, one-turn conversations, trains `align` and `clip` as it is.
NOT_THIS_FORMAT = {
    "caption": ("missing_caption",),
    "conversation": ("missing_json", "missing_conversation"),
}
ALTERNATIVE = {"caption": "conversation", "conversation": "caption"}


def _convert(sample: dict[str, Any], format: str, **kwargs: Any) -> Record:
    try:
        return CONVERTERS[format](sample, **kwargs)
    except (TypeError, AttributeError, KeyError) as exc:  # valid JSON of the wrong shape: bad data, counted
        raise SkipSample("bad_json", f"a field of the wrong type ({type(exc).__name__}: {exc})") from exc


def to_record(
    sample: dict[str, Any], format: str, caption_prompts: Sequence[str] | None = None, caption_field: str = "caption"
) -> Record:
    """Convert one decoded sample with the converter registered for `format`, or, when the sample is not in that
    format at all, with the other image format (`ALTERNATIVE`); a sample that fits neither keeps the first reason."""
    if format not in CONVERTERS:
        raise ValueError(f"unknown data format {format!r}; expected one of {sorted(CONVERTERS)}")
    kwargs = {"caption_prompts": caption_prompts, "caption_field": caption_field}
    try:
        return _convert(sample, format, **kwargs)
    except SkipSample as exc:
        other = ALTERNATIVE.get(format)
        if other is None or exc.reason not in NOT_THIS_FORMAT[format]:
            raise
        try:
            return _convert(sample, other, **kwargs)
        except SkipSample as second:
            if second.reason in NOT_THIS_FORMAT[other]:
                raise exc from None  # in neither format: the stage's own reason
            raise second from None
