"""Progressive resolution, the model side: the stage keeps its encoder on the image size each batch was built at.

The data layer builds every batch at the size its resolution schedule gives (`vlm.data.resolution`) and says so in
`batch["stream"]["image_size"]`; before the step the stage (`Stage.on_train_batch_start`) switches the encoder to it:
position embeddings interpolated, and the optimizer's parameter groups pointed at any table the encoder replaced.
`tokens_per_image_at` is what the runner hands the DataModule, so that it can write the right number of `<image>`
tokens at every size without knowing the model.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch

log = logging.getLogger(__name__)


def tokens_per_image_at(model: Any, size: int) -> int:
    """`model.tokens_per_image` the model would have at `size`, computed without touching its weights.

    A shallow copy of the encoder shares every parameter; only its `image_size` attribute is set, so `grid` and
    `num_tokens` (which derive from it) answer for the new size; the projector maps that to tokens per tile.
    """
    encoder = model.encoder
    if int(size) == int(encoder.image_size):
        return int(model.tokens_per_image)
    probe = copy.copy(encoder)
    object.__setattr__(probe, "image_size", int(size))
    return int(model.projector.num_tokens(probe.num_tokens, probe.grid))


def _named_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(module.named_parameters())


def set_encoder_size(model: Any, size: int, optimizers: list[Any] | tuple[Any, ...] = (),
                     expected_tokens: int | None = None) -> bool:
    """`model.encoder.set_image_size(size)` if it differs; returns whether it switched.

    Some encoders (timm's `set_input_size`) replace their position table by a new Parameter: the new one gets the
    old one's `requires_grad`, and optimizers that held the old tensor are pointed at the new one (its optimizer
    state is dropped: the shapes differ). Under DDP/FSDP such a replacement is not safe (the wrapper registered
    the old tensor), so a warning says so. With `expected_tokens`, `model.tokens_per_image` is checked afterwards.
    """
    encoder = model.encoder
    if int(encoder.image_size) == int(size):
        return False
    before = _named_parameters(encoder)
    encoder.set_image_size(int(size))
    after = _named_parameters(encoder)
    replaced = {name: (old, after[name]) for name, old in before.items() if name in after and after[name] is not old}
    for name, (old, new) in replaced.items():
        new.requires_grad_(old.requires_grad)
        swapped = False
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                for i, param in enumerate(group["params"]):
                    if param is old:
                        group["params"][i] = new
                        optimizer.state.pop(old, None)
                        swapped = True
        if swapped:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            log.warning(
                "encoder.set_image_size(%d) replaced the trainable parameter encoder.%s; the optimizer now updates "
                "the new tensor (its Adam state restarts)%s", size, name,
                "; under DDP/FSDP the wrapper still holds the old tensor, so this is NOT safe: use an encoder that "
                "interpolates position embeddings on the fly" if distributed else "",
            )
    if expected_tokens is not None and hasattr(model, "tokens_per_image"):
        actual = int(model.tokens_per_image)
        if actual != int(expected_tokens):
            raise RuntimeError(
                f"after set_image_size({size}) the model has {actual} tokens per image but the data was built with "
                f"{expected_tokens}: the encoder's grid does not follow its image_size"
            )
    log.info("image size -> %d (%s tokens per image)", size, getattr(model, "tokens_per_image", "?"))
    return True


def match_batch_resolution(model: Any, batch: Mapping[str, Any], optimizers: list[Any] | tuple[Any, ...] = (),
                           tokens: Mapping[int, int] | None = None) -> bool:
    """Switch `model.encoder` to the image size `batch` was built at (`batch["stream"]["image_size"]`, else the
    pixel tiles' height); nothing for text-only batches or models without an encoder. Returns whether it switched."""
    encoder = getattr(model, "encoder", None)
    if encoder is None or not hasattr(encoder, "set_image_size"):
        return False
    stream = batch.get("stream")
    size = stream.get("image_size") if isinstance(stream, Mapping) else None
    pixels = batch.get("pixel_values")
    if size is None and isinstance(pixels, torch.Tensor) and pixels.dim() == 4:
        size = int(pixels.shape[-1])
    if size is None:
        return False
    expected = (tokens or {}).get(int(size))
    if expected is None and hasattr(model, "projector") and int(size) != int(encoder.image_size):
        expected = tokens_per_image_at(model, int(size))  # what the data side was told for this size
    return set_encoder_size(model, int(size), optimizers, expected)
