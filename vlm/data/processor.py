"""Record -> token ids, labels and pixel tiles, for any tokenizer with a chat template.

Assistant spans are found by rendering message prefixes (render(messages[:i]) + generation prompt versus
render(messages[:i+1])), so no template needs `{% generation %}` tags. Labels cover the assistant reply and the
token(s) that end it, which teaches the model to stop; the newline a template adds after the end token is not
labelled. `<image>` is expanded at the id level, after labelling, so offsets always refer to the rendered text.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from jinja2.runtime import new_context as _new_context

from vlm.data.formats import Record
from vlm.data.images import Grid, image_placeholder
from vlm.data.tokens import GLOBAL_IMAGE_TOKEN, IM_END, IMAGE_TOKEN, tile_tokens

IGNORE_INDEX = -100


def _long(values: list[int]) -> torch.Tensor:
    """A 1D int64 tensor from a list (a third of `torch.tensor(list)`'s time)."""
    return torch.from_numpy(np.fromiter(values, dtype=np.int64, count=len(values)))


class TruncationError(ValueError):
    """A sample that does not fit `max_length` without cutting an image (or all of its labels) away."""


class ChatRenderer:
    """`tokenizer.apply_chat_template(messages, tokenize=False, ...)`, about 4x cheaper.

    The processor renders each conversation several times (once per assistant prefix), and Hugging Face's wrapper
    spends most of its time normalising messages that are already plain dicts of strings. This runs the compiled
    jinja template's render function directly with the same variables (messages, add_generation_prompt, the special
    tokens, the template's globals), merged once per template rather than per call (jinja's `Template.render`
    spends two thirds of a short template's time building that context). The first
    `checks` renders of every template are compared with `apply_chat_template`; any difference (or error) falls
    back to it for good, so the output is always the wrapper's.
    """

    def __init__(self, tokenizer: Any, checks: int = 16):
        self.tokenizer = tokenizer
        self.checks = checks
        self._reset(None)

    def _reset(self, template: Any) -> None:
        self._template_text = template
        self._compiled: Any = None
        self._variables: dict[str, Any] = {}
        self._checks_left = self.checks
        self._direct = True

    def reference(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def __call__(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        template = getattr(self.tokenizer, "chat_template", None)
        if template is not self._template_text:
            self._reset(template)
        if not self._direct or not isinstance(template, str):
            return self.reference(messages, add_generation_prompt)
        try:
            if self._compiled is None:
                from transformers.utils.chat_template_utils import _compile_jinja_template

                self._compiled = _compile_jinja_template(template)
                # what Template.render(**variables) puts into a fresh context: the globals, then the variables
                self._variables = {**self._compiled.globals, **self.tokenizer.special_tokens_map,
                                   "tools": None, "documents": None}
            compiled = self._compiled
            variables = {**self._variables, "messages": messages, "add_generation_prompt": add_generation_prompt}
            context = _new_context(compiled.environment, compiled.name, compiled.blocks, variables, True)
            text = compiled.environment.concat(compiled.root_render_func(context))
        except Exception:  # a template or a transformers version this shortcut does not cover
            self._direct = False
            return self.reference(messages, add_generation_prompt)
        if self._checks_left > 0:
            self._checks_left -= 1
            expected = self.reference(messages, add_generation_prompt)
            if text != expected:
                self._direct = False
                return expected
        return text

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_compiled"] = None  # compiled templates do not pickle; recompiled (and re-checked) in the worker
        state["_variables"] = {}  # with their globals
        state["_template_text"] = None
        return state


class Prepared:
    """A record whose images are done (`Processor.prepare`), its text still to do (`Processor.finish`)."""

    __slots__ = ("record", "pixel_values", "grids")

    def __init__(self, record: Record, pixel_values: torch.Tensor | None, grids: list[Grid]):
        self.record, self.pixel_values, self.grids = record, pixel_values, grids


class Processor:
    """`__call__(record)` for training, `prompt(record)` for generation; see docs/architecture.md.

    image_transform: callable `PIL image -> (tiles (n,3,H,W), grid)` (an `ImageTransform`); may be None for
    text-only data. tokens_per_image: tokens one tile becomes after the projector.
    """

    def __init__(
        self,
        tokenizer: Any,
        image_transform: Callable[[Any], tuple[torch.Tensor, Grid]] | None,
        tokens_per_image: int,
        max_length: int = 2048,
    ):
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.tokens_per_image = int(tokens_per_image)
        self.max_length = int(max_length)
        self.image_token_id = self._token_id(IMAGE_TOKEN)
        max_tiles = int(getattr(image_transform, "max_tiles", 1) or 1)
        markers = [GLOBAL_IMAGE_TOKEN, *tile_tokens(max_tiles)]
        marker_ids = (tokenizer.convert_tokens_to_ids(t) for t in markers)
        self._image_ids = {self.image_token_id} | {
            i for i in marker_ids if i is not None and i != tokenizer.unk_token_id
        }
        self._placeholder_ids: dict[Grid, list[int]] = {}
        self._end_tokens = [t for t in (IM_END, tokenizer.eos_token) if t]
        self._render = ChatRenderer(tokenizer)
        # the Rust tokenizer behind a fast tokenizer, called directly on the hot path; checked like ChatRenderer
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend_checks = 16

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {token!r} token: call vlm.data.tokens.add_vlm_tokens first")
        return token_id

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def image_size(self) -> int | None:
        return getattr(self.image_transform, "image_size", None)

    def at_image_size(self, image_size: int, tokens_per_image: int) -> Processor:
        """A copy that resizes images to `image_size` and writes `tokens_per_image` placeholders per tile
        (progressive resolution: the model's tokens per image at that size). Shares the tokenizer."""
        new = copy.copy(self)
        if self.image_transform is not None:
            new.image_transform = copy.copy(self.image_transform)
            new.image_transform.image_size = int(image_size)
        new.tokens_per_image = int(tokens_per_image)
        new._placeholder_ids = {}
        return new

    # ------------------------------------------------------------ rendering

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The chat template applied to `messages` as text."""
        return self._render(messages, add_generation_prompt)

    def _assistant_spans(self, messages: list[dict[str, str]], full: str) -> list[tuple[int, int]]:
        """Character spans of each assistant reply plus its end token inside `full`."""
        spans, cursor = [], 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            upto = full if i == len(messages) - 1 else self.render(messages[: i + 1])
            prefix = self.render(messages[:i], add_generation_prompt=True) if i else ""
            if i and upto.startswith(prefix) and full.startswith(upto):
                start, end = len(prefix), len(upto.rstrip())
            else:  # a template that rewrites history (or starts with an assistant turn): find the reply text
                start = full.find(message["content"], cursor)
                if start < 0:
                    raise ValueError("chat template output does not contain the assistant reply verbatim")
                end = start + len(message["content"])
                rest = full[end:]
                for token in self._end_tokens:
                    if rest.lstrip(" ").startswith(token):
                        end += len(rest) - len(rest.lstrip(" ")) + len(token)
                        break
            spans.append((start, end))
            cursor = end
        return spans

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, character offsets) of `text` without special tokens added."""
        if self._backend is not None:
            try:
                enc = self._backend.encode(text, add_special_tokens=False)
                ids, offsets = list(enc.ids), [tuple(o) for o in enc.offsets]
            except Exception:
                self._backend = None
            else:
                if self._backend_checks <= 0:
                    return ids, offsets
                self._backend_checks -= 1
                ref_ids, ref_offsets = self._encode_reference(text)
                if (ids, offsets) == (ref_ids, ref_offsets):
                    return ids, offsets
                self._backend = None
        return self._encode_reference(text)

    def _encode_reference(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def _tokenize_chat(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        ids, offsets = self._encode(text)
        labels = [IGNORE_INDEX] * len(ids)
        spans = sorted(spans)  # disjoint, so their ends ascend too
        k = 0
        for n, (start, end) in enumerate(offsets):  # offsets ascend: one pass over both
            while k < len(spans) and spans[k][1] <= start:
                k += 1
            # any overlap (spans[k] is the first that ends after `start`): a token that merges a template space
            # with the reply's first word is part of the reply
            if end > start and k < len(spans) and spans[k][0] < end:
                labels[n] = ids[n]
        return ids, labels

    # ------------------------------------------------------------ images

    def _images(self, record: Record) -> tuple[torch.Tensor | None, list[Grid]]:
        if not record.images:
            return None, []
        if self.image_transform is None:
            raise ValueError(f"sample {record.key!r} has images but the processor has no image_transform")
        tiles, grids = [], []
        for image in record.images:
            pixels, grid = self.image_transform(image)
            tiles.append(pixels)
            grids.append(tuple(grid))
        return (tiles[0] if len(tiles) == 1 else torch.cat(tiles)), grids

    def _placeholder(self, grid: Grid) -> list[int]:
        if grid not in self._placeholder_ids:
            text = image_placeholder(grid, self.tokens_per_image)
            self._placeholder_ids[grid] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._placeholder_ids[grid]

    def _expand(self, ids: list[int], labels: list[int], grids: list[Grid], key: str) -> tuple[list[int], list[int]]:
        """Replace the n-th `<image>` id with the n-th image's placeholder ids (never labelled)."""
        count = ids.count(self.image_token_id)
        if count != len(grids):
            raise ValueError(f"sample {key!r}: {count} {IMAGE_TOKEN} tokens in the text but {len(grids)} images")
        if not grids:
            return ids, labels
        out_ids: list[int] = []
        out_labels: list[int] = []
        previous = 0
        positions = (n for n, token in enumerate(ids) if token == self.image_token_id)
        for position, grid in zip(positions, grids):
            expansion = self._placeholder(grid)
            out_ids += ids[previous:position]
            out_ids += expansion
            out_labels += labels[previous:position]
            out_labels += [IGNORE_INDEX] * len(expansion)
            previous = position + 1
        out_ids += ids[previous:]
        out_labels += labels[previous:]
        return out_ids, out_labels

    def _check_length(self, ids: list[int], key: str, cut_ok: bool) -> int:
        """Length to keep; raises when a cut would split or drop an image (or when no cut is allowed)."""
        if len(ids) <= self.max_length:
            return len(ids)
        tail = ids[self.max_length :]
        if not cut_ok or any(t in self._image_ids for t in tail):
            what = "an image's tokens" if cut_ok else "the generation prompt"
            raise TruncationError(
                f"sample {key!r}: {len(ids)} tokens > max_length {self.max_length}, and truncating would cut {what}"
            )
        return self.max_length

    # ------------------------------------------------------------ public

    def _text(self, record: Record) -> dict[str, Any]:
        ids = list(self.tokenizer(record.text, add_special_tokens=True)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        ids = ids[: self.max_length]
        tensor = _long(ids)
        return {"input_ids": tensor, "labels": tensor.clone(), "key": record.key}

    def __call__(self, record: Record) -> dict[str, Any]:
        """Training features: input_ids, labels (-100 outside assistant replies), pixel_values if any, key."""
        result = self.finish([self.prepare(record)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def prepare(self, record: Record) -> Prepared:
        """`__call__` in two halves, for a batch: `prepare` each sample (its images), then `finish` them together
        (their text, one after another). In a row, the chat template and the tokenizer stay in the CPU caches:
        tokenising right after an image's decode and resize took 3-8x as long as tokenising in a row."""
        if not record.messages and record.text is None:
            raise ValueError(f"sample {record.key!r} has neither messages nor text")
        if not record.messages:
            return Prepared(record, None, [])
        return Prepared(record, *self._images(record))

    def finish(self, prepared: Sequence[Prepared]) -> list[dict[str, Any] | Exception]:
        """The training features of each prepared sample, or the exception its text raised, in order."""
        out: list[dict[str, Any] | Exception] = []
        for item in prepared:
            try:
                out.append(self._finish(item))
            except Exception as exc:  # the caller decides (the stream counts data errors, re-raises bugs)
                out.append(exc)
        return out

    def _finish(self, item: Prepared) -> dict[str, Any]:
        record = item.record
        if not record.messages:
            return self._text(record)
        full = self.render(record.messages)
        ids, labels = self._tokenize_chat(full, self._assistant_spans(record.messages, full))
        ids, labels = self._expand(ids, labels, item.grids, record.key)
        keep = self._check_length(ids, record.key, cut_ok=True)
        ids, labels = ids[:keep], labels[:keep]
        if labels.count(IGNORE_INDEX) == len(labels):
            raise TruncationError(
                f"sample {record.key!r}: no assistant tokens left within max_length {self.max_length}"
            )
        out: dict[str, Any] = {
            "input_ids": _long(ids),
            "labels": _long(labels),
            "key": record.key,
        }
        if item.pixel_values is not None:
            out["pixel_values"] = item.pixel_values
        rejected = record.meta.get("rejected")
        if rejected is not None:  # a preference pair: the same prompt and images, the rejected reply (no pixels)
            other = Record(messages=[*record.messages[:-1], {"role": "assistant", "content": rejected}],
                           meta={"key": record.key})
            alternative = self._finish(Prepared(other, None, item.grids))
            out["rejected_input_ids"], out["rejected_labels"] = alternative["input_ids"], alternative["labels"]
        return out

    def prompt(self, record: Record) -> dict[str, Any]:
        """Generation input: the conversation without its final assistant reply, ending in the assistant prompt.

        For a text record: the text's tokens without eos (a prefix to continue).
        """
        if not record.messages:
            ids = list(self.tokenizer(record.text or "", add_special_tokens=True)["input_ids"])
            return {"input_ids": torch.tensor(ids[: self.max_length], dtype=torch.long), "key": record.key}
        messages = record.messages
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        text = self.render(messages, add_generation_prompt=True)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        pixel_values, grids = self._images(record)
        ids, _ = self._expand(ids, [IGNORE_INDEX] * len(ids), grids, record.key)
        self._check_length(ids, record.key, cut_ok=False)
        out: dict[str, Any] = {"input_ids": torch.tensor(ids, dtype=torch.long), "key": record.key}
        if pixel_values is not None:
            out["pixel_values"] = pixel_values
        return out
