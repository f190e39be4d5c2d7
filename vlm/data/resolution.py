"""Progressive resolution, the data side: which image size applies to which batch, and a processor per size.

A schedule maps optimizer steps to image sizes, `{0: 224, 1000: 336}`: steps 0-999 at 224, then 336. DataLoader
workers build (and tokenise) the batches, so each worker must know the size of the batch it is building: batch b of
a rank is made by worker b % W as its (b // W)-th batch (torch's round robin over workers, which Lightning keeps),
so the worker computes b, the step b // accumulate_grad_batches and the size itself (`vlm.data.stream`). Every batch
carries the size it was built at (`batch["stream"]["image_size"]`); the stage switches the encoder to it before the
step (`vlm.stages.resolution`), so the model and the batch always agree on pixels and on `<image>` tokens per tile.
"""
from __future__ import annotations

import bisect
import copy
from collections.abc import Mapping
from typing import Any


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
                    "the DataModule needs `tokens_per_image_at` (the runner passes the model's) for a resolution "
                    "schedule"
                )
            self._cache[size] = processor_at_size(self.base, size, self.tokens.get(size))
        return self._cache[size]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}
