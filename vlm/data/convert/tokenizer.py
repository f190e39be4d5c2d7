"""Shards -> a byte-level BPE tokenizer for their text (captions and conversation turns), with the VLM special
tokens. For a decoder or text tower trained from random weights on your data; a pretrained model brings its own.

    python -m vlm.data.convert tokenizer shards=/data/mine/train.txt vocab_size=8000 out=/data/mine/tokenizer
"""
from __future__ import annotations

from pathlib import Path

from vlm.data.bpe import DEFAULT_MAX_TILES, shard_origins, shard_texts, train_bpe_tokenizer


def convert_tokenizer(shards: str, vocab_size: int, out: str | Path, max_tiles: int = DEFAULT_MAX_TILES,
                      caption_field: str = "caption", quiet: bool = False) -> Path:
    """Train on every caption and turn in `shards` (anything `data.train` takes) and save to `out`."""
    texts = shard_texts(shards, caption_field)
    if not quiet:
        from tqdm.auto import tqdm

        texts = tqdm(texts, desc="texts", unit="text", dynamic_ncols=True)
    texts = list(texts)
    if not texts:
        raise ValueError(f"no captions or conversations found in {shards!r}: nothing to train a tokenizer on")
    tokenizer = train_bpe_tokenizer(texts, out, vocab_size, max_tiles, trained_on=shard_origins(shards))
    print(f"tokenizer: {len(tokenizer)} entries from {len(texts)} texts -> {out}")
    return Path(out)
