"""The special tokens a VLM needs and the one place that adds them to a tokenizer.

Image placeholders and tile markers must stay single tokens (the model splices image features at their
positions), so they are registered as *special* tokens; ChatML is the fallback chat template so that every
tokenizer, even a base LM's, can render conversations.
"""
from __future__ import annotations

from typing import Any

from vlm.data.chat_templates import CHATML_TEMPLATE, IM_END, IM_START, set_chat_template

IMAGE_TOKEN = "<image>"
GLOBAL_IMAGE_TOKEN = "<global_img>"
PAD_TOKEN = "<pad>"


def tile_token(row: int, col: int) -> str:
    """Marker that leads tile (row, col) of a tiled image; 1-based like LLaVA-NeXT/Idefics3."""
    return f"<row_{row}_col_{col}>"


def tile_tokens(max_tiles: int) -> list[str]:
    """Every marker a grid with rows*cols <= max_tiles can use (tile (i, j) exists only if i*j <= max_tiles)."""
    if max_tiles <= 1:
        return []
    return [tile_token(i, j) for i in range(1, max_tiles + 1) for j in range(1, max_tiles // i + 1)]


def vlm_special_tokens(max_tiles: int = 1) -> list[str]:
    """All VLM special tokens in a fixed order (the order new ids are assigned in)."""
    base = [PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN]
    return base + tile_tokens(max_tiles)


def add_vlm_tokens(tokenizer: Any, max_tiles: int = 1, chat_template: str | None = None) -> Any:
    """Add the missing VLM special tokens, a pad token and a chat template; returns the tokenizer.

    `chat_template`: a named template (`vlm.data.chat_templates`: chatml, llava_v1) that replaces the tokenizer's
    own; None keeps the tokenizer's, or ChatML if it has none. The vocabulary may grow: size the model's embeddings
    with `len(tokenizer)`, not `tokenizer.vocab_size`.
    """
    added = tokenizer.get_added_vocab()  # added (special) tokens are matched before the model splits text
    missing = [t for t in vlm_special_tokens(max_tiles) if t not in added]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD_TOKEN
    if chat_template:
        return set_chat_template(tokenizer, chat_template)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
        if tokenizer.eos_token is None:
            tokenizer.eos_token = IM_END
    return tokenizer


def load_tokenizer(name_or_path: str, max_tiles: int = 1, trust_remote_code: bool = False,
                   chat_template: str | None = None, **kwargs: Any) -> Any:
    """`AutoTokenizer.from_pretrained` followed by `add_vlm_tokens` (no remote code unless asked)."""
    from transformers import AutoTokenizer

    from vlm.hub import named_model

    with named_model(name_or_path, "tokenizer", "model.tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs)
    return add_vlm_tokens(tokenizer, max_tiles=max_tiles, chat_template=chat_template)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids that end an assistant turn (eos and `<|im_end|>` when present): pass to generation as stop tokens."""
    ids = []
    for token in (tokenizer.eos_token, IM_END):
        if token is not None:
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is not None and tid != tokenizer.unk_token_id and tid not in ids:
                ids.append(tid)
    return ids
