"""Sequence packing: whole samples best-fit into rows of at most `pack_length` tokens, resumable exactly.

A row holds several samples one after another. `PackedCollator` gives each sample its own position ids (from 0),
masks the label of each sample's first token (position i predicts token i + 1, so nothing is learned across the
boundary: the unpacked run never predicts a first token either), concatenates the pixel tiles in sample order
(the model splices them in that order) and lists every sample's key. The model keeps attention inside each sample
from the restarting position ids (`vlm.models.attention`).

The stream packs per *chunk*: `pack_buffer` processed samples (a unit of work read from the raw stream like a batch),
best-fit-decreasing into rows, the rows served in order of their first sample, `batch_size` rows per batch (a batch
may take the end of one chunk and the start of the next). A chunk is a deterministic function of where it starts in
the raw stream and the image size it was processed at, so the stream position after a batch is a *cursor*
`raw_position * ROWS_PER_CHUNK + rows_served` (the start of the chunk the next row comes from, and how many of its
rows were served): a resumed worker re-reads that chunk (decoding only `pack_buffer` samples again) and skips the
served rows. `vlm.data.stream` stores the cursor where an unpacked stream stores a raw position.

With a resolution schedule a chunk is processed at the size of the batch that starts it; when a later batch's size
differs, the chunk's unserved samples are dropped (a warning counts them) and a new chunk starts at the new size.

A unit of packing is a processed sample (a dict) or a tuple/list of them that must share a row, in order (e.g. a
preference pair: chosen and rejected); each member still gets its own positions and attention block.
"""
from __future__ import annotations

import bisect
import itertools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from vlm.data.collate import Collator, Parts, concat
from vlm.data.processor import IGNORE_INDEX, TruncationError

log = logging.getLogger(__name__)

ROWS_PER_CHUNK = 1 << 16  # the cursor's radix: a chunk never yields more rows than this (pack_buffer is capped)

Unit = dict[str, Any] | Sequence[dict[str, Any]]


def members(unit: Unit) -> list[dict[str, Any]]:
    """The samples of a packing unit, in order."""
    return [unit] if isinstance(unit, dict) else list(unit)


def unit_length(unit: Unit) -> int:
    return sum(len(s["input_ids"]) for s in members(unit))


def best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each item, longest first, goes into the row with the least free room that still fits it
    (else a new row). Returns rows of item indices, each row's items in ascending index (stream) order, the rows in
    order of their first item. Items longer than `capacity` are an error (the caller filters them)."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"an item of {max(lengths)} tokens does not fit a row of {capacity}")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free room, row number), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot < len(free):
            room, row = free.pop(slot)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        bisect.insort(free, (room - lengths[i], row))
    rows = [sorted(r) for r in rows]
    return sorted(rows, key=lambda r: r[0])


class PackedCollator:
    """Rows of packing units -> one batch: `input_ids`, `labels`, `attention_mask` (1 on real tokens),
    `position_ids` (0, 1, ... per sample; 0 on padding), `pixel_values` (all tiles in row and sample order) and
    `keys` (every sample's key, in the same order)."""

    def __init__(self, pad_token_id: int):
        self.collator = Collator(pad_token_id, padding_side="right")

    def __call__(self, rows: Sequence[Sequence[Unit]], lazy: bool = False) -> dict[str, Any]:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        merged, positions, pixels, keys = [], [], [], []
        for row in rows:
            samples = [s for unit in row for s in members(unit)]
            labels = []
            for s in samples:
                own = s["labels"].clone()
                own[0] = IGNORE_INDEX  # the first token is never a target: no loss across the boundary
                labels.append(own)
            merged.append({"input_ids": concat([s["input_ids"] for s in samples]), "labels": concat(labels)})
            positions.append(torch.from_numpy(np.concatenate([np.arange(len(s["input_ids"])) for s in samples])))
            pixels += [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
            keys += [str(s.get("key", "")) for s in samples]
        batch = self.collator(merged)
        batch["position_ids"] = self.collator.pad(positions, 0, batch["input_ids"].shape[1])
        if pixels:
            batch["pixel_values"] = (
                Parts(pixels) if lazy and all(p.device.type == "cpu" for p in pixels) else concat(pixels))
        batch["keys"] = keys
        return batch


class _Chunk:
    """A chunk's rows, where it starts and ends in the raw stream, its image size and the rows served so far."""

    __slots__ = ("rows", "start", "end", "size", "served")

    def __init__(self, rows: list[list[Unit]], start: int, end: int, size: int | None):
        self.rows, self.start, self.end, self.size, self.served = rows, start, end, size, 0

    @property
    def left(self) -> int:
        return len(self.rows) - self.served


class Packer:
    """The training stream's packing step (`StreamDataset(..., packer=...)`): chunks of `pack_buffer` units,
    best-fit into rows of `pack_length` tokens, `batch_size` rows a batch; see the module docstring."""

    def __init__(self, pack_length: int, pack_buffer: int, pad_token_id: int):
        if int(pack_length) < 1:
            raise ValueError(f"pack_length must be positive, got {pack_length}")
        if not 1 <= int(pack_buffer) < ROWS_PER_CHUNK:
            raise ValueError(f"pack_buffer must lie in [1, {ROWS_PER_CHUNK - 1}], got {pack_buffer}")
        self.pack_length = int(pack_length)
        self.pack_buffer = int(pack_buffer)
        self.collate = PackedCollator(pad_token_id)

    def signature(self) -> list[int]:
        """What a checkpointed cursor depends on (the DataModule checks it before an exact resume)."""
        return [self.pack_length, self.pack_buffer]

    def _chunk(self, dataset: Any, raw: Iterator, start: int, size: int | None, handler: Any) -> _Chunk | None:
        units, last = dataset.next_samples(raw, dataset.processors.get(size), handler, count=self.pack_buffer)
        if not units:
            return None
        lengths = []
        fitting = []
        for unit in units:
            n = unit_length(unit)
            if n > self.pack_length:  # a group of samples (each fits alone) longer than a row: too long
                keys = ", ".join(str(s.get("key", "")) for s in members(unit))
                handler(TruncationError(f"samples {keys}: {n} tokens together > pack_length {self.pack_length}"))
                continue
            lengths.append(n)
            fitting.append(unit)
        rows = [[fitting[i] for i in row] for row in best_fit(lengths, self.pack_length)]
        return _Chunk(rows, start, last + 1, size)

    def batches(self, dataset: Any, epoch: int, stream: int, workers: int, worker: int, salt: int, base: int,
                cursor: int, quota: int | None, in_worker: bool) -> Iterator[dict[str, Any]]:
        """The packed batches of one logical stream from `cursor` on (`StreamDataset.__iter__`'s loop, packed)."""
        from vlm.data.handover import pack_batch

        position, served = divmod(int(cursor), ROWS_PER_CHUNK)
        raw, handler = dataset.open_raw(epoch, stream, workers, salt, position)

        fixed = dataset.state.read()["image_size"] or None

        def size_for(index: int) -> int | None:
            return dataset.schedule.size_for_batch(max(index, 0)) if dataset.schedule else fixed

        chunk: _Chunk | None = None
        # a resumed chunk was processed at the size of this logical stream's previous batch (index - workers)
        resume_size = size_for(base + worker - workers) if served else None
        for j in itertools.count():
            if quota is not None and j >= quota:
                return
            index = base + j * workers + worker
            size = size_for(index)
            rows: list[list[Unit]] = []
            dry = False
            while len(rows) < dataset.batch_size:
                if chunk is None:
                    chunk = self._chunk(dataset, raw, position, resume_size if served else size, handler)
                    if chunk is None:
                        dry = True
                        break
                    chunk.served, served = min(served, len(chunk.rows)), 0
                if chunk.size != size:
                    log.warning("image size %s -> %s: %d packed rows of the packing buffer dropped", chunk.size,
                                size, chunk.left)
                    chunk.served = len(chunk.rows)
                take = chunk.rows[chunk.served : chunk.served + dataset.batch_size - len(rows)]
                chunk.served += len(take)
                rows += take
                if chunk.left == 0:
                    position, chunk = chunk.end, None
            if not rows:
                return
            batch = self.collate(rows, lazy=in_worker)
            here = chunk.start * ROWS_PER_CHUNK + chunk.served if chunk is not None else position * ROWS_PER_CHUNK
            batch["stream"] = {"worker": stream, "epoch": epoch, "position": here, "index": index,
                               "image_size": size if size is not None else dataset.processors.base_size}
            yield pack_batch(batch) if in_worker else batch
            if dry:
                return


def packing_for(processor: Any, pack_length: int | None, pack_buffer: int) -> tuple[Any, Packer]:
    """(the processor to use, the `Packer`) for `data.packing=true`: rows of `pack_length` tokens (default the
    processor's `max_length`). A shorter `pack_length` becomes the processor's `max_length` (a copy), so a sample
    longer than a row goes through the processor's too-long policy (truncated where that loses no image, else
    skipped and counted as `too_long`)."""
    import copy

    max_length = getattr(processor, "max_length", None)
    if max_length is None or getattr(processor, "pad_token_id", None) is None:
        raise ValueError("data.packing applies to the next-token stages (lm, align, sft): this stage's processor "
                         f"({type(processor).__name__}) makes no token rows to pack")
    length = int(pack_length) if pack_length else int(max_length)
    if length < int(max_length):
        processor = copy.copy(processor)
        processor.max_length = length
    log.info("packing: rows of %d tokens, best fit over %d samples", length, pack_buffer)
    return processor, Packer(length, pack_buffer, processor.pad_token_id)
