"""Turn a model config or a model directory into the three things every stage and task needs.

(model, tokenizer, processor): the processor is derived from the model (its encoder's resolution and
normalisation, its tokens per image, its context length), so training and evaluation always agree on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn


def build_processor(model: nn.Module, tokenizer: Any, max_tiles: int | None = None, max_length: int | None = None):
    """The processor that turns records into this model's token and pixel tensors."""
    from vlm.data.images import ImageTransform
    from vlm.data.processor import Processor
    from vlm.models.clip import ClipModel

    if isinstance(model, ClipModel):  # a dual encoder: one image and its caption per sample
        return model.processor(tokenizer)

    cfg = getattr(model, "config", {}) or {}
    encoder = model.encoder
    transform = ImageTransform(
        image_size=encoder.image_size,
        mean=encoder.image_mean,
        std=encoder.image_std,
        max_tiles=max_tiles or cfg.get("max_tiles", 1),
    )
    return Processor(tokenizer, transform, model.tokens_per_image, max_length=max_length or cfg.get("max_length", 512))


def load_model(model_cfg: Mapping[str, Any], init_from: str | Path | None = None):
    """Build a model from its config, or load the model directory `init_from` and apply the config's resolution.

    Returns (model, tokenizer). A config with a `text_encoder` is a dual encoder (the `clip` stage's model).
    `init_from` may also be a local transformers Llava directory (`vlm.interop.llava`). `chat_template` (a named
    template) replaces the tokenizer's own when set.
    """
    from vlm.data.tokens import load_tokenizer
    from vlm.models.clip import is_clip_config, load_clip_model
    from vlm.models.vlm import VisionLanguageModel

    if is_clip_config(model_cfg):
        return load_clip_model(model_cfg, init_from)

    chat_template = model_cfg.get("chat_template")
    if init_from:
        from vlm.interop.llava import import_llava, is_llava_directory

        if is_llava_directory(init_from):  # a transformers Llava checkpoint: it keeps its own resolution
            return import_llava(init_from, chat_template=chat_template)
        model, tokenizer = VisionLanguageModel.from_pretrained(init_from)
        size = (model_cfg.get("encoder") or {}).get("image_size")
        if size and size != model.encoder.image_size:
            model.encoder.set_image_size(size)
        if chat_template and tokenizer is not None:
            from vlm.data.chat_templates import set_chat_template

            set_chat_template(tokenizer, chat_template)
        return model, tokenizer
    tokenizer = load_tokenizer(model_cfg["tokenizer"], max_tiles=model_cfg.get("max_tiles", 1),
                               chat_template=chat_template)
    return VisionLanguageModel.from_config(dict(model_cfg), tokenizer), tokenizer
