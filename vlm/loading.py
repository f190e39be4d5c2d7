"""Turn a model config or a model directory into the three things every stage and task needs.

(model, tokenizer, processor): the processor is derived from the model (its encoder's resolution and
normalisation, its tokens per image, its context length), so training and evaluation always agree on it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

log = logging.getLogger("vlm")


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


def load_model(model_cfg: Mapping[str, Any], init_from: str | Path | None = None, explicit: Collection[str] = (),
               trusted: bool = True, trust_remote_code: bool | None = None):
    """Build a model from its config, or load the model directory `init_from` as it is.

    A loaded model keeps its architecture and image size; of the composed config only the keys named in `explicit`
    (relative to `model.`, see `explicit_model_keys`) are applied to it (`adapt_loaded`).
    Returns (model, tokenizer). A config with a `text_encoder` is a dual encoder (the `clip` stage's model).
    `trusted`: `model_cfg` is the user's own (conf/ and the command line, which may name the user's code); False
    for a config read back from disk, whose parts must be registered types (vlm.models.registry). A model
    directory is always loaded as data. `trust_remote_code` (None: the user's `model.decoder.trust_remote_code`
    when trusted, else False) is never taken from a file.
    `init_from` may also be a local transformers Llava directory (`vlm.interop.llava`). `chat_template` (a named
    template) replaces the tokenizer's own when set.
    """
    from vlm.data.tokens import load_tokenizer
    from vlm.models.clip import ClipModel, is_clip_config
    from vlm.models.vlm import VisionLanguageModel

    if trust_remote_code is None and trusted:
        trust_remote_code = (model_cfg.get("decoder") or {}).get("trust_remote_code")
    if is_clip_config(model_cfg):
        if init_from:
            model, tokenizer = ClipModel.from_pretrained(init_from, trust_remote_code=bool(trust_remote_code))
            adapt_loaded(model, model_cfg, explicit, init_from)
            return model, tokenizer
        # built from its config; the text tokenizer as it is (no VLM special tokens)
        tokenizer = load_text_tokenizer(model_cfg["tokenizer"])
        return ClipModel.from_config(model_cfg, tokenizer, trusted, trust_remote_code), tokenizer

    chat_template = model_cfg.get("chat_template")
    if init_from:
        from vlm.interop.llava import import_llava, is_llava_directory

        if is_llava_directory(init_from):  # a transformers Llava checkpoint: it keeps its own resolution
            named = chat_template if "chat_template" in explicit else None
            return import_llava(init_from, chat_template=named)
        model, tokenizer = VisionLanguageModel.from_pretrained(init_from, trust_remote_code=bool(trust_remote_code))
        adapt_loaded(model, model_cfg, explicit, init_from, tokenizer)
        return model, tokenizer
    tokenizer = load_tokenizer(model_cfg["tokenizer"], max_tiles=model_cfg.get("max_tiles", 1),
                               trust_remote_code=bool(trust_remote_code), chat_template=chat_template)
    return VisionLanguageModel.from_config(dict(model_cfg), tokenizer, trusted, trust_remote_code), tokenizer


def load_text_tokenizer(name_or_path: str | Path) -> Any:
    """A dual encoder's text tokenizer as it is; its pad token is the end-of-text token when it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---- init_from: the loaded model is kept -----------------------------------------------------------------------
# The keys of the composed `model` config that can change a loaded model, when given explicitly.
ADJUSTABLE_KEYS = ("encoder.image_size", "max_length", "chat_template")


def explicit_model_keys(overrides: Sequence[str]) -> list[str]:
    """The `model` keys these Hydra overrides set, relative to `model.` (`encoder.image_size`), and group choices
    below it as `model/encoder`. The `model=NAME` choice itself is not one: with init_from the loaded directory
    is the model."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if key.startswith("model.") or key.startswith("model/"):
            keys.append(key[len("model."):] if key.startswith("model.") else key)
    return keys


def adapt_loaded(model: nn.Module, model_cfg: Mapping[str, Any], explicit: Collection[str],
                 source: str | Path, tokenizer: Any = None) -> list[str]:
    """Apply the explicitly given `ADJUSTABLE_KEYS` of `model_cfg` to a loaded model; returns what changed.

    Changes are logged in one line; explicit keys that would change the architecture are logged as ignored.
    """
    changes, ignored = [], []
    for key in explicit:
        if key not in ADJUSTABLE_KEYS:
            ignored.append(key if "/" in key else f"model.{key}")
            continue
        value = model_cfg
        for part in key.split("."):
            value = (value or {}).get(part) if isinstance(value, Mapping) else None
        if key == "encoder.image_size" and value and int(value) != model.encoder.image_size:
            changes.append(f"image size {model.encoder.image_size} -> {int(value)} px")
            model.encoder.set_image_size(int(value))
        elif key == "max_length" and value and hasattr(model, "config") and value != model.config.get("max_length"):
            changes.append(f"max_length {model.config.get('max_length')} -> {int(value)}")
            model.config["max_length"] = int(value)
        elif key == "chat_template" and value and tokenizer is not None:
            from vlm.data.chat_templates import set_chat_template

            changes.append(f"chat template -> {value}")
            set_chat_template(tokenizer, value)
    if changes:
        log.warning("init_from %s: changed the loaded model: %s", source, "; ".join(changes))
    if ignored:
        log.warning("init_from %s: the loaded model keeps its architecture; ignored: %s (only %s can change)",
                    source, ", ".join(ignored), ", ".join(f"model.{k}" for k in ADJUSTABLE_KEYS))
    return changes
