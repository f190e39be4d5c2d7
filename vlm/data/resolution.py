"""Progressive resolution: which image size applies to which batch, and keeping the model on the batch's size.

A schedule maps optimizer steps to image sizes, `{0: 224, 1000: 336}`: steps 0-999 at 224, then 336. DataLoader
workers build (and tokenise) the batches, so each worker must know the size of the batch it is building: batch b of
a rank is made by worker b % W as its (b // W)-th batch (torch's round robin over workers, which Lightning keeps),
so the worker computes b, the step b // accumulate_grad_batches and the size itself (`vlm.data.stream`). Every batch
carries the size it was built at (`batch["stream"]["image_size"]`); `match_batch_resolution` switches the encoder to
it before the step (the DataModule calls it from `on_after_batch_transfer`), so the model and the batch always agree
on pixels and on `<image>` tokens per tile.
"""
from __future__ import annotations

import bisect
import copy
import logging
from typing import Any, Mapping

import torch

log = logging.getLogger(__name__)


class ResolutionSchedule:
    """Optimizer step -> image size. `schedule`: {first_step: size}; it must start at step 0."""

    def __init__(self, schedule: Mapping[int | str, int], accumulate_grad_batches: int = 1):
        items = sorted((int(step), int(size)) for step, size in dict(schedule).items())
        if not items:
            raise ValueError("empty resolution schedule")
        if items[0][0] != 0:
            raise ValueError(f"a resolution schedule starts at step 0, got first step {items[0][0]}")
        if any(size <= 0 for _, size in items):
            raise ValueError(f"image sizes must be positive: {dict(items)}")
        self.steps = [s for s, _ in items]
        self.sizes_by_step = [z for _, z in items]
        self.accumulate_grad_batches = max(1, int(accumulate_grad_batches))

    @property
    def sizes(self) -> list[int]:
        """Distinct sizes, in schedule order."""
        return list(dict.fromkeys(self.sizes_by_step))

    def size_at_step(self, step: int) -> int:
        return self.sizes_by_step[bisect.bisect_right(self.steps, int(step)) - 1]

    def size_for_batch(self, batch_index: int) -> int:
        """Size of a rank's batch number `batch_index` (0-based, counted over the whole stage)."""
        return self.size_at_step(int(batch_index) // self.accumulate_grad_batches)

    def as_dict(self) -> dict[int, int]:
        return dict(zip(self.steps, self.sizes_by_step))

    def __repr__(self) -> str:
        return f"ResolutionSchedule({self.as_dict()}, accumulate_grad_batches={self.accumulate_grad_batches})"


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


def processor_at_size(processor: Any, size: int, tokens_per_image: int | None) -> Any:
    """The processor for another image size (its own `at_image_size`, else a copy with a resized transform)."""
    if hasattr(processor, "at_image_size"):
        return processor.at_image_size(size, tokens_per_image if tokens_per_image is not None else 0)
    new = copy.copy(processor)
    transform = getattr(processor, "image_transform", None)
    if transform is not None:
        new.image_transform = copy.copy(transform)
        new.image_transform.image_size = int(size)
    if tokens_per_image is not None and hasattr(new, "tokens_per_image"):
        new.tokens_per_image = int(tokens_per_image)
    return new


class ProcessorSizes:
    """One processor per image size, made on first use in whichever process asks (workers included).

    `tokens`: {size: tokens per image tile}, needed for processors that write `<image>` placeholders.
    """

    def __init__(self, processor: Any, tokens: Mapping[int, int] | None = None):
        self.base = processor
        self.base_size = getattr(getattr(processor, "image_transform", None), "image_size", None)
        self.tokens = {int(k): int(v) for k, v in (tokens or {}).items()}
        self._cache: dict[int, Any] = {}

    def get(self, size: int | None) -> Any:
        if size is None or size == self.base_size:
            return self.base
        if size not in self._cache:
            needs_tokens = hasattr(self.base, "tokens_per_image")
            if needs_tokens and size not in self.tokens:
                raise ValueError(
                    f"no tokens-per-image known for image size {size} (known: {sorted(self.tokens)}); "
                    "the DataModule needs the model (`set_model`) to prepare a resolution schedule"
                )
            self._cache[size] = processor_at_size(self.base, size, self.tokens.get(size))
        return self._cache[size]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}


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
    return set_encoder_size(model, int(size), optimizers, expected)
