"""The training stream: a deterministic function of (seed, rank, worker, position), batched inside the workers.

Each DataLoader worker reads one *logical stream*: its sources' shards (resampled with an RNG seeded by
(seed, source, epoch, rank, logical worker), or in epoch mode shuffled by (seed, source, epoch) and split by node
then by worker), each source through its own seeded shuffle buffer of raw bytes, the sources mixed by a seeded RNG.
Only then are samples decoded, converted and tokenised, so a raw position in that stream names a sample exactly.

The worker builds whole batches. Batch b of a rank comes from physical worker b % W as its (b // W)-th batch
(torch's round robin), so the worker knows b, and with it the image size the resolution schedule gives b. Every
batch carries `batch["stream"] = {"worker", "epoch", "position", "index", "image_size"}`: the logical stream it
came from and the raw position just after its last sample (packed: a cursor into the packing buffer's chunk,
`vlm.data.packing`).

`StreamProgress` (main process) records the batches served to training; `StreamLoader.__iter__` hands the workers,
through shared memory, where to start: epoch, first batch index, and per logical stream the raw position to
fast-forward to (skipping raw samples, never decoding them). Resuming after k batches with k % W = r, physical
worker w reads logical stream (w + r) % W, which continues the round robin exactly where it stopped.
"""
from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import os
import random
import weakref
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from vlm.data.collate import Collator, Parts
from vlm.data.pipeline import (
    DEFAULT_MAX_CONSECUTIVE_SKIPS, NoUsableSamples, SampleFn, SkipCounter, SkipRun, Source, mix_samples, raw_samples,
    shard_assignment,
)
from vlm.data.resolution import ProcessorSizes, ResolutionSchedule

log = logging.getLogger(__name__)

_HEADER = ("epoch", "base", "rotation", "remaining", "image_size", "salt")

# ---------------------------------------------------------------- batch hand-over through shared memory

_ALIGN = 64          # every tensor of a packed buffer starts at a multiple of this (any dtype's alignment)
_POOL_SIZE = 6       # shared buffers a worker keeps for reuse (batches in flight: prefetch_factor, plus those held)


def _new_shared(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of `nbytes` in fresh shared memory (no zero-filled copy first, as `share_memory_` makes)."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))


class _Slot:
    """One buffer of a worker's pool: its number in the pool, and whether the main process has mapped it yet."""

    __slots__ = ("buffer", "number", "sent")

    def __init__(self, buffer: torch.Tensor, number: int):
        self.buffer, self.number, self.sent = buffer, number, False


class _BufferPool:
    """A worker's shared-memory buffers, reused once the main process has let go of the batch in them.

    Fresh shared memory costs a page fault per 4 KiB page on first write (about 15 ms for the 19 MB of a batch of
    32 images at 224 px, as much as the tensors' copy ten times over); a reused buffer is already mapped. Byte 0 of
    each buffer says who holds it: 1 from `take` in the worker until the main process drops every tensor of the
    batch (`_Lease`), then 0. A buffer still held is never written; when none is free a new one is made, and a
    full pool forgets its oldest (still held by the main process, e.g. a batch kept in a list: freed there when
    dropped, just not reused).

    The main process keeps its mapping of each buffer (`_MAPPED`), so a buffer's file descriptor crosses over once,
    not with every batch (torch passes one through a socket with an authentication handshake each time), and the
    main process does not fault the pages in again each time it reads a batch. Forgotten buffers are named in the
    next batch, and the main process unmaps them.
    """

    def __init__(self, size: int = _POOL_SIZE):
        self.size = size
        self.slots: list[_Slot] = []
        self.forgotten: list[int] = []
        self.pid = os.getpid()
        self._numbers = itertools.count()

    def take(self, nbytes: int) -> _Slot:
        """A buffer of at least `nbytes` (header included), marked held."""
        if self.pid != os.getpid():  # a forked worker: its parent's buffers are shared with the parent, not its own
            self.slots, self.forgotten, self.pid = [], [], os.getpid()
        free = [s for s in self.slots if s.buffer.numpy()[0] == 0]
        fitting = [s for s in free if s.buffer.numel() >= nbytes]
        if fitting:
            chosen = min(fitting, key=lambda s: s.buffer.numel())
        else:
            # free ones are all too small: they would only ever be passed over
            drop = [s for s in self.slots if any(s is f for f in free)]
            if len(self.slots) - len(drop) >= self.size:
                drop.append(next(s for s in self.slots if not any(s is d for d in drop)))
            self.slots = [s for s in self.slots if not any(s is d for d in drop)]
            self.forgotten += [s.number for s in drop if s.sent]
            # slack for the next batches' longer texts or extra tiles, in whole pages
            chosen = _Slot(_new_shared(-(-(nbytes + nbytes // 8) // 4096) * 4096), next(self._numbers))
            self.slots.append(chosen)
        chosen.buffer.numpy()[0] = 1
        return chosen

    def pop_forgotten(self) -> list[int]:
        forgotten, self.forgotten = self.forgotten, []
        return forgotten


_POOL = _BufferPool()
_MAPPED: dict[tuple[int, int], torch.Tensor] = {}  # main process: (worker pid, buffer number) -> its mapping


class _Lease:
    """Held (through numpy's `base`) by every tensor `unpack_batch` makes from one buffer; when the last of them
    is gone, byte 0 of the buffer is set to 0 and the worker may write the buffer again."""

    def __init__(self, buffer: torch.Tensor):
        self.__array_interface__ = {"data": (buffer.data_ptr(), False), "shape": (buffer.numel(),),
                                    "typestr": "|u1", "version": 3}
        self.buffer = buffer
        weakref.finalize(self, _release, buffer[:1].numpy())


def _release(flag: np.ndarray) -> None:
    flag[0] = 0


class _Packed:
    """A packed batch's buffer and layout. Pickled (worker -> main) as the buffer's pool number and the layout,
    plus the buffer itself (torch shares its memory by file descriptor) the first time; the receiving side takes
    the lease, so dropping a batch unread also frees it."""

    def __init__(self, buffer: torch.Tensor, layout: list[tuple], order: list[str], slot: _Slot | None = None,
                 forgotten: list[int] | None = None):
        self.buffer, self.layout, self.order = buffer, layout, order
        self.slot, self.forgotten = slot, forgotten or []

    def __reduce__(self) -> tuple:
        if self.slot is None:
            return _received, (self.buffer, self.layout, self.order)
        first = not self.slot.sent  # pickled once per batch, in order, by the worker's queue thread
        self.slot.sent = True
        return _received, (self.buffer if first else None, self.layout, self.order,
                           (os.getpid(), self.slot.number, self.forgotten))

    def pin_memory(self, device: Any = None) -> "_Packed":
        """DataLoader(pin_memory=True): the whole buffer copied to pinned memory at once (the shared one is
        released when this object goes)."""
        pinned = self.buffer.pin_memory() if device is None else self.buffer.pin_memory(device)
        return _Packed(pinned, self.layout, self.order)

    def tensors(self) -> dict[str, torch.Tensor]:
        lease = getattr(self, "lease", None)
        if lease is None and self.buffer.is_shared():  # unpacked in the process that packed it
            lease = self.lease = _Lease(self.buffer)
        raw = np.asarray(lease) if lease is not None else self.buffer.numpy()
        out = {}
        for key, start, dtype, shape in self.layout:
            size = math.prod(shape) * _itemsize(dtype)
            out[key] = torch.from_numpy(raw[start : start + size]).view(dtype).view(shape)
        return out


def _received(buffer: torch.Tensor | None, layout: list[tuple], order: list[str],
              pooled: tuple[int, int, list[int]] | None = None) -> _Packed:
    if pooled is not None:
        pid, number, forgotten = pooled
        for gone in forgotten:
            _MAPPED.pop((pid, gone), None)
        if buffer is not None:
            _forget_exited_workers()
            _MAPPED[(pid, number)] = buffer
        else:
            buffer = _MAPPED.get((pid, number))
            if buffer is None:
                raise RuntimeError(f"batch in buffer {number} of worker {pid}, which this process never received")
    packed = _Packed(buffer, layout, order)
    packed.lease = _Lease(buffer)
    return packed


def _forget_exited_workers() -> None:
    """Unmap the buffers of workers that have exited (a finished DataLoader's), so their memory is freed."""
    alive = {p.pid for p in multiprocessing.active_children()} | {os.getpid()}
    for key in [k for k in _MAPPED if k[0] not in alive]:
        del _MAPPED[key]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _is_cpu_tensor(value: Any) -> bool:
    return isinstance(value, Parts) or (isinstance(value, torch.Tensor) and value.device.type == "cpu")


def pack_batch(batch: dict[str, Any], pool: _BufferPool | None = None) -> dict[str, Any]:
    """In a worker: every CPU tensor of the batch (and `Parts`) copied into one shared-memory buffer.

    torch's default hand-over shares each tensor separately, and each costs a round trip to the worker over a
    socket to pass its file descriptor; on a busy machine that is milliseconds per tensor, several per batch.
    One buffer costs one round trip. Buffers come from the worker's pool (reused once the main process has
    dropped the batch's tensors). `unpack_batch` (in `StreamLoader`) gives back views of it, zero-copy.
    """
    tensors = [(k, v) for k, v in batch.items() if _is_cpu_tensor(v)]
    if not tensors:
        return batch
    layout, offset = [], _ALIGN  # bytes before the first tensor: the buffer's header (byte 0: held flag)
    for key, value in tensors:
        offset = -(-offset // _ALIGN) * _ALIGN
        layout.append((key, offset, value.dtype, tuple(value.shape)))
        offset += math.prod(value.shape) * _itemsize(value.dtype)
    pool = pool or _POOL
    slot = pool.take(offset)
    buffer = slot.buffer
    raw = buffer.numpy()
    for (key, start, dtype, _), (_, value) in zip(layout, tensors):
        for part in value.tensors if isinstance(value, Parts) else [value]:
            size = part.numel() * _itemsize(dtype)
            target = raw[start : start + size]
            if part.is_contiguous():  # numpy: one thread, a plain copy
                target[:] = part.reshape(-1).view(torch.uint8).numpy()
            else:  # one strided copy straight into place, not .contiguous() and then a copy
                target = torch.from_numpy(target).view(dtype).view(part.shape)
                try:
                    np.copyto(target.numpy(), part.numpy())
                except TypeError:  # a dtype numpy lacks (bfloat16)
                    target.copy_(part)
            start += size
    packed = {k: v for k, v in batch.items() if not _is_cpu_tensor(v)}
    packed["__packed__"] = _Packed(buffer, layout, list(batch), slot, pool.pop_forgotten())
    return packed


def unpack_batch(batch: Any) -> Any:
    """The batch `pack_batch` packed, its tensors as views of the shared buffer, keys in their order."""
    if not isinstance(batch, dict) or "__packed__" not in batch:
        return batch
    packed = batch.pop("__packed__")
    tensors = packed.tensors()
    return {k: tensors[k] if k in tensors else batch[k] for k in packed.order}


class StreamState:
    """Where the next iteration starts, in shared memory so that persistent workers see the main process's
    values when torch restarts their iteration: epoch, base (index of the first batch), rotation (logical =
    (physical + rotation) % W), remaining (batches left in a virtual epoch, -1 = unbounded), image_size (for
    evaluation streams), salt (re-seeding after an inexact resume) and one raw start position per logical stream."""

    def __init__(self, num_streams: int):
        self.num_streams = max(1, int(num_streams))
        self._array = multiprocessing.Array("q", len(_HEADER) + self.num_streams)
        self.write(epoch=0, base=0, rotation=0, remaining=-1, image_size=0, salt=0, positions=None)

    def write(self, positions: Sequence[int] | None = None, **values: int) -> None:
        with self._array.get_lock():
            for name, value in values.items():
                self._array[_HEADER.index(name)] = int(value)
            if positions is not None:
                if len(positions) != self.num_streams:
                    raise ValueError(f"{len(positions)} positions for {self.num_streams} streams")
                for i, p in enumerate(positions):
                    self._array[len(_HEADER) + i] = int(p)

    def read(self) -> dict[str, Any]:
        with self._array.get_lock():
            values = list(self._array)
        out: dict[str, Any] = dict(zip(_HEADER, values[: len(_HEADER)]))
        out["positions"] = values[len(_HEADER):]
        return out


class StreamDataset(IterableDataset):
    """Batches (collated dicts) from one or more sources; see the module docstring.

    train=True: shuffled, resampled or epoch-wise, fast-forwardable, resolution per batch index.
    train=False: one ordered pass over each source's shards in turn (split by node and worker), no shuffling,
    at the image size the main process wrote into the state (the model's current one).
    """

    def __init__(
        self,
        sources: Sequence[Source],
        sample_fns: Sequence[SampleFn],
        processors: ProcessorSizes,
        collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
        counter: SkipCounter,
        state: StreamState,
        batch_size: int,
        num_workers: int,
        train: bool = True,
        resampled: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        shardshuffle: int | bool = True,
        schedule: ResolutionSchedule | None = None,
        rank: int = 0,
        world_size: int = 1,
        max_consecutive_skips: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS,
        packer: Any = None,
    ):
        super().__init__()
        self.max_consecutive_skips = max_consecutive_skips
        self.sources = list(sources)
        self.sample_fns = list(sample_fns)
        self.processors = processors
        self.collate = collate
        self.counter = counter
        self.state = state
        self.batch_size = int(batch_size)
        self.num_streams = max(1, int(num_workers))
        self.train = train
        self.resampled = bool(resampled) and train
        self.seed = int(seed)
        self.shuffle_buffer = int(shuffle_buffer or 0)
        self.shardshuffle = bool(shardshuffle)
        self.schedule = schedule
        self.rank, self.world_size = int(rank), int(world_size)
        self.packer = packer if train else None  # `vlm.data.packing.Packer`: packed rows; positions are cursors

    # ------------------------------------------------------------ raw streams

    def _tag(self, epoch: int, salt: int) -> str:
        return f"{self.seed}/{epoch}/{salt}" if salt else f"{self.seed}/{epoch}"

    def _source_urls(self, index: int, epoch: int, salt: int, stream: int, streams: int,
                     failed: set[str] | None = None) -> Iterator[str]:
        """This stream's shard URLs of one source; resampled, never one in `failed` (a shard that could not be
        read), and none at all once every shard has failed."""
        source = self.sources[index]
        tag = f"{self._tag(epoch, salt)}/{source.name}"
        if not self.train:
            urls = source.val_urls or []
            return iter(shard_assignment(urls, self.rank, self.world_size, stream, streams))
        if self.resampled:
            rng = random.Random(f"{tag}/shards/{self.rank}/{stream}")
            urls = list(source.urls)
            failed = failed if failed is not None else set()
            return _resample(urls, rng, failed)
        urls = list(source.urls)
        if self.shardshuffle:
            random.Random(f"{tag}/shards").shuffle(urls)  # the same order on every rank and worker
        return iter(shard_assignment(urls, self.rank, self.world_size, stream, streams))

    def raw_stream(self, epoch: int, stream: int, streams: int, salt: int = 0,
                   run: SkipRun | None = None) -> Iterator[tuple[int, dict]]:
        """(source index, raw sample) of one logical stream: deterministic in (seed, epoch, salt, rank, stream)."""
        per_source = []
        for i, source in enumerate(self.sources):
            failed: set[str] = set()
            urls = self._source_urls(i, epoch, salt, stream, streams, failed)
            buffer = 0
            if self.train:
                buffer = self.shuffle_buffer if source.shuffle_buffer is None else int(source.shuffle_buffer)
            rng = random.Random(f"{self._tag(epoch, salt)}/{source.name}/samples/{self.rank}/{stream}")
            per_source.append(raw_samples(urls, self.counter, buffer, rng, failed, run))
        if not self.train:  # evaluation: each source in turn, in shard order
            return ((i, s) for i, it in enumerate(per_source) for s in it)
        rng = random.Random(f"{self._tag(epoch, salt)}/mix/{self.rank}/{stream}")
        return mix_samples(per_source, [s.weight for s in self.sources], rng)

    # ------------------------------------------------------------ batches

    def _samples(self, raw: Iterator[tuple[int, tuple[int, dict]]], processor: Any,
                 handler: Callable[[Exception], bool], count: int | None = None) -> tuple[list[Any], int | None]:
        """The next batch's processed samples (the first `count` (default `batch_size`) raw samples that process
        without a data error) and the raw position of the last raw sample read (None: the stream had nothing left).

        In two phases (`SampleFn.prepare`, then the processors' `finish` for all of them in a row), refilled while
        the second phase drops samples, so the samples, skips and position are those of processing one by one.
        """
        samples: list[Any] = []
        position = None
        run = getattr(handler, "run", None)
        count = self.batch_size if count is None else count
        while len(samples) < count:
            pending: list[tuple[Any, Any]] = []
            for position, (source, sample) in raw:
                try:
                    pending.append(self.sample_fns[source].prepare(sample, processor))
                except Exception as exc:  # counted per reason, never fatal
                    handler(exc)
                    if run is not None and pending and run.exceeded():
                        break  # settle the pending samples: one may be usable (else the next skip stops)
                    continue
                if run is not None:
                    run.pending = len(pending)
                if len(samples) + len(pending) == count:
                    break
            if run is not None:
                run.pending = 0
            if not pending:
                break
            results: list[Any] = [result for owner, result in pending]
            for owner in {id(o): o for o, _ in pending if o is not None}.values():
                index = [i for i, (o, _) in enumerate(pending) if o is owner]
                for i, result in zip(index, owner.finish([pending[i][1] for i in index])):
                    results[i] = result
            if run is not None:  # the usable ones among them hold the stop back until they are counted
                run.pending = sum(not isinstance(r, Exception) for r in results)
            for result in results:
                if isinstance(result, Exception):
                    handler(result)
                else:
                    samples.append(result)
                    if run is not None:
                        run.used()
                        run.pending -= 1
            if run is not None:
                run.pending = 0
                if run.exceeded():
                    raise run.error()
        return samples, position

    def open_raw(self, epoch: int, stream: int, workers: int, salt: int, start: int
                 ) -> tuple[Iterator[tuple[int, tuple[int, dict]]], Callable[[Exception], bool]]:
        """(numbered raw samples from `start` on, the skip handler) of one logical stream; the handler's run of
        consecutive skips stops a stream that yields nothing (`SkipRun`)."""
        what = "training data" if self.train else "validation data"
        run = SkipRun(self.max_consecutive_skips, what, self.sample_fns[0].caption_field if self.sample_fns else "")
        raw = enumerate(self.raw_stream(epoch, stream, workers, salt, run))
        if start:  # fast-forward over raw bytes: nothing is decoded
            run.pending = 1  # the skips passed over were counted by the interrupted run: they stop nothing now
            for _ in itertools.islice(raw, start):
                pass
            run.pending = 0
            run.used()
        return raw, self.counter.handler("processing_error", run)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        state = self.state.read()
        epoch, base, salt = state["epoch"], state["base"], state["salt"]
        positions = state["positions"] if workers == self.num_streams else [0] * workers
        if workers != self.num_streams and any(state["positions"]):
            log.warning("stream state was written for %d workers but %d run: starting at position 0",
                        self.num_streams, workers)
        stream = (worker + state["rotation"]) % workers
        start = positions[stream] if self.train else 0
        quota = None
        if self.train and state["remaining"] >= 0:
            quota = max(0, math.ceil((state["remaining"] - worker) / workers))
        fixed_size = state["image_size"] or None
        if self.packer is not None:
            yield from self.packer.batches(self, epoch, stream, workers, worker, salt, base, start, quota,
                                           in_worker=info is not None)
            return

        raw, handler = self.open_raw(epoch, stream, workers, salt, start)
        for j in itertools.count():
            if quota is not None and j >= quota:
                return
            index = base + j * workers + worker
            size = self.schedule.size_for_batch(index) if (self.train and self.schedule) else fixed_size
            processor = self.processors.get(size)
            samples, position = self._samples(raw, processor, handler)
            if not samples:
                return
            if info is not None and isinstance(self.collate, Collator):  # pixels go straight to shared memory
                batch = self.collate(samples, lazy=True)
            else:
                batch = self.collate(samples)
            batch["stream"] = {
                "worker": stream,
                "epoch": epoch,
                "position": position + 1,
                "index": index,
                "image_size": size if size is not None else self.processors.base_size,
            }
            yield pack_batch(batch) if info is not None else batch
            start = position + 1
            if len(samples) < self.batch_size:
                return


def _resample(urls: list[str], rng: random.Random, failed: set[str]) -> Iterator[str]:
    """Shards drawn with replacement, except those in `failed` (filled while reading); ends when all have failed.
    While none has failed, the draws are `rng.choice(urls)`, as before failures were tracked."""
    while True:
        live = [u for u in urls if u not in failed] if failed else urls
        if not live:
            log.error("every shard of this stream failed to read: %s%s", ", ".join(urls[:3]),
                      " ..." if len(urls) > 3 else "")
            return
        yield rng.choice(live)


class StreamProgress:
    """Main-process bookkeeping of the batches served to training; the DataModule's checkpoint state."""

    VERSION = 1

    def __init__(self, num_streams: int, batches_per_epoch: int | None = None):
        self.num_streams = max(1, int(num_streams))
        self.batches_per_epoch = int(batches_per_epoch) if batches_per_epoch else None
        self.served = 0            # training batches served, over all epochs of the stage
        self.epoch = -1            # current epoch of the stream (-1: not started)
        self.epoch_start = 0       # `served` when the current epoch began
        self.finished = True       # the current epoch's loader ran dry: the next iteration starts a new epoch
        self.positions = [0] * self.num_streams
        self.salt = 0
        self.image_size: int | None = None  # size of the last served batch

    def begin(self, state: StreamState) -> None:
        """Called when a training iteration starts: a new epoch, or the rest of the current one (resume)."""
        if self.finished:
            self.epoch += 1
            self.epoch_start = self.served
            self.positions = [0] * self.num_streams
            self.finished = False
        done = self.served - self.epoch_start
        remaining = -1
        if self.batches_per_epoch:
            remaining = max(0, self.batches_per_epoch - done)
        state.write(epoch=self.epoch, base=self.served, rotation=done % self.num_streams, remaining=remaining,
                    salt=self.salt, positions=self.positions)

    def record(self, meta: dict[str, Any]) -> None:
        """One training batch was served (its `batch["stream"]`)."""
        worker = int(meta["worker"])
        if 0 <= worker < self.num_streams:
            self.positions[worker] = int(meta["position"])
        self.served += 1
        if meta.get("image_size") is not None:
            self.image_size = int(meta["image_size"])
        if self.batches_per_epoch and self.served - self.epoch_start >= self.batches_per_epoch:
            self.finished = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.VERSION, "served": self.served, "epoch": self.epoch, "epoch_start": self.epoch_start,
            "finished": self.finished, "positions": list(self.positions), "salt": self.salt,
            "image_size": self.image_size,
        }

    def load(self, state: dict[str, Any], positions: Sequence[int] | None, exact: bool) -> None:
        self.served = int(state["served"])
        self.epoch = int(state["epoch"])
        self.epoch_start = int(state["epoch_start"])
        self.finished = bool(state["finished"])
        self.image_size = state.get("image_size")
        self.salt = int(state.get("salt", 0))
        if exact and positions is not None and len(positions) == self.num_streams:
            self.positions = [int(p) for p in positions]
        else:  # a new stream for the rest of this epoch, seeded by the batch count: no replay of the same order
            self.positions = [0] * self.num_streams
            self.salt = self.served + 1


class StreamLoader(DataLoader):
    """A DataLoader over a `StreamDataset` (batches come whole from the workers: `batch_size=None`).

    Each `iter()` first writes the start state for the workers (training: from `progress`; evaluation: the
    current image size), then yields at most `limit` batches; running dry marks the training epoch finished.
    """

    def __init__(self, dataset: StreamDataset, progress: StreamProgress | None = None,
                 image_size: Callable[[], int | None] | None = None, limit: int | None = None, **kwargs: Any):
        super().__init__(dataset, batch_size=None, **kwargs)
        self.progress = progress
        self.image_size = image_size
        self.limit = limit

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        dataset: StreamDataset = self.dataset  # type: ignore[assignment]
        if self.progress is not None:
            self.progress.begin(dataset.state)
        elif self.image_size is not None:
            dataset.state.write(image_size=self.image_size() or 0)
        return self._batches(super().__iter__())

    def _batches(self, iterator: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        count = 0
        for batch in iterator:
            yield unpack_batch(batch)
            count += 1
            if self.limit is not None and count >= self.limit:
                return
        dataset: StreamDataset = self.dataset  # type: ignore[assignment]
        skipped = dataset.counter.counts()
        if count == 0 and skipped and dataset.state.read()["remaining"] != 0:
            # nothing usable at all (e.g. every shard unreadable): an endless loop of empty epochs otherwise
            what = "training" if dataset.train else "validation"
            counts = ", ".join(f"{r} {n}" for r, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
            raise NoUsableSamples(f"the {what} stream yielded no batch; skipped samples: {counts}")
        if self.progress is not None:
            self.progress.finished = True
