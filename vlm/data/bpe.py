"""A byte-level BPE tokenizer trained on your own text, with the VLM special tokens, and a note of what it was
trained on, so a stage that trains a random decoder can tell when the tokenizer was built for other data.

The shapes world (`vlm/data/synthetic/shapes.py`) and `python -m vlm.data.convert tokenizer` both train with
`train_bpe_tokenizer`. The note is `trained_on.json` in the tokenizer directory: the directories of the shards it
read (absolute paths) and the URLs of remote ones.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

TRAINED_ON_FILE = "trained_on.json"
DEFAULT_MAX_TILES = 9  # tile markers for grids up to 9 tiles are part of the vocabulary
# The chat template's role names and the caption prompts are in every training sequence: seen often enough to
# become single tokens even on a small corpus.
_EXTRA_REPEATS = 50


def train_bpe_tokenizer(texts: Iterable[str], directory: str | os.PathLike, vocab_size: int,
                        max_tiles: int = DEFAULT_MAX_TILES, trained_on: Sequence[str] = ()) -> Any:
    """Byte-level BPE on `texts`, wrapped in PreTrainedTokenizerFast with the VLM special tokens (ids 0.. in
    `vlm_special_tokens` order, `<pad>` = 0) and the ChatML template; saved to `directory`, returned.

    `trained_on`: where the texts came from (shard directories or URLs), written to `trained_on.json`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from vlm.data.formats import DEFAULT_CAPTION_PROMPTS
    from vlm.data.tokens import CHATML_TEMPLATE, IM_END, PAD_TOKEN, add_vlm_tokens, vlm_special_tokens

    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=vlm_special_tokens(max_tiles),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    extra = ["user", "assistant", "system", "user\n", "assistant\n", *DEFAULT_CAPTION_PROMPTS]
    model.train_from_iterator([*texts, *(extra * _EXTRA_REPEATS)], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, pad_token=PAD_TOKEN, eos_token=IM_END)
    tokenizer.chat_template = CHATML_TEMPLATE
    add_vlm_tokens(tokenizer, max_tiles)  # registers the rest as special (they already have ids)
    directory = Path(directory)
    tokenizer.save_pretrained(str(directory))
    (directory / TRAINED_ON_FILE).write_text(json.dumps({"trained_on": list(trained_on)}, indent=2))
    return tokenizer


def sample_texts(sample: dict[str, Any], caption_field: str = "caption") -> list[str]:
    """The text of one decoded shard sample: its caption (`txt` or the json field) and every conversation turn,
    `<image>` tags removed."""
    from vlm.data.formats import caption_text, json_field
    from vlm.data.tokens import IMAGE_TOKEN

    texts = []
    caption = caption_text(sample, caption_field)
    if caption:
        texts.append(caption)
    turns = json_field(sample.get("json"), "conversations") if isinstance(sample.get("json"), dict) else None
    for turn in turns if isinstance(turns, list) else []:
        content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
        if isinstance(content, str) and content.replace(IMAGE_TOKEN, "").strip():
            texts.append(content.replace(IMAGE_TOKEN, "").strip())
    return texts


def _specs(shards: str | Sequence[str]) -> list[str]:
    """Shard specs as a list, `a.txt::b.txt` split (expand_shards splits `::` only inside one pattern)."""
    return [part for spec in ([shards] if isinstance(shards, str) else shards) for part in str(spec).split("::")]


def shard_texts(shards: str | Sequence[str], caption_field: str = "caption") -> Iterator[str]:
    """Every caption and conversation turn in the shards, in shard order (images are not decoded)."""
    from vlm.data.tar import iterate_samples

    for sample in iterate_samples(_specs(shards), decode_images=False):
        yield from sample_texts(sample, caption_field)


def shard_origins(shards: str | Sequence[str]) -> list[str]:
    """Where shards live: the absolute directories of local ones, the URLs of the others (sorted, unique)."""
    from vlm.data.shards import expand_shards

    origins = set()
    for url in expand_shards(_specs(shards)):
        local = "://" not in url and not url.startswith("pipe:")
        origins.add(str(Path(url.removeprefix("file:")).resolve().parent) if local else url)
    return sorted(origins)


def trained_on(tokenizer_dir: str | os.PathLike) -> list[str] | None:
    """The shard origins a tokenizer directory was trained on; None when it does not say (a hub tokenizer)."""
    path = Path(tokenizer_dir) / TRAINED_ON_FILE
    if not path.is_file():
        return None
    try:
        return [str(o) for o in json.loads(path.read_text()).get("trained_on", [])]
    except (OSError, ValueError, AttributeError):
        return None


def foreign_tokenizer_warning(tokenizer_dir: str | os.PathLike, shards: str | Sequence[str]) -> str | None:
    """A warning when `tokenizer_dir` says it was trained on shards elsewhere than the `shards` a stage trains on;
    None when they agree, or when either side cannot tell."""
    origins = trained_on(tokenizer_dir)
    if not origins:
        return None
    try:
        data = shard_origins(shards)
    except (FileNotFoundError, ValueError):
        return None  # the DataModule reports bad shard lists itself
    elsewhere = [d for d in data if not any(d == o or d.startswith(o.rstrip("/") + "/") for o in origins)]
    if not elsewhere:
        return None
    return (f"the tokenizer {tokenizer_dir} was built for other data ({', '.join(origins)}), and this stage trains "
            f"a random decoder or text tower on {', '.join(elsewhere)}: words it never saw split into many pieces. "
            f"Build one for your data: python -m vlm.data.convert tokenizer shards=PATTERN vocab_size=8000 "
            f"out=DIR, then model.tokenizer=DIR")


def warn_foreign_tokenizer(model_cfg: dict[str, Any], trainable: Sequence[str], data_cfg: dict[str, Any]) -> str | None:
    """Log `foreign_tokenizer_warning` when a stage trains a randomly initialised decoder or text tower (a part
    in `trainable` whose config says `pretrained: false`) with a tokenizer directory from `model_cfg`."""
    import logging

    random_parts = [p for p in ("decoder", "text_encoder")
                    if p in trainable and isinstance(model_cfg.get(p), dict) and not model_cfg[p].get("pretrained")]
    tokenizer = model_cfg.get("tokenizer")
    if not random_parts or not tokenizer or not Path(str(tokenizer)).is_dir():
        return None
    sources = data_cfg.get("sources") or {}
    specs = [s.get("train") for s in sources.values() if isinstance(s, dict)] or [data_cfg.get("train")]
    shards = [str(x) for spec in specs if spec for x in (spec if isinstance(spec, list) else [spec])]
    message = foreign_tokenizer_warning(tokenizer, shards) if shards else None
    if message:
        logging.getLogger("vlm").warning(message)
    return message
