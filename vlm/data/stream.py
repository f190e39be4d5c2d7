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

`StreamProgress` (main process, `vlm.data.loader`) records the batches served to training; `StreamLoader.__iter__`
hands the workers, through shared memory (`StreamState`), where to start: epoch, first batch index, and per logical
stream the raw position to fast-forward to (skipping raw samples, never decoding them). Resuming after k batches
with k % W = r, physical worker w reads logical stream (w + r) % W, which continues the round robin exactly where
it stopped.
"""
from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset

from vlm.data.collate import Collator
from vlm.data.formats import decode_sample, to_record
from vlm.data.handover import pack_batch
from vlm.data.resolution import ProcessorSizes, ResolutionSchedule
from vlm.data.shards import Source, resample_shards, shard_assignment
from vlm.data.skips import DEFAULT_MAX_CONSECUTIVE_SKIPS, SkipCounter, SkipRun
from vlm.data.tar import raw_samples

log = logging.getLogger(__name__)

_HEADER = ("epoch", "base", "rotation", "remaining", "image_size", "salt")


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


class SampleFn:
    """Raw sample -> decoded -> Record -> processor output (picklable, so spawned workers can run it).

    `processor` passed to the call overrides the default one (another image size, see `vlm.data.resolution`).
    """

    def __init__(
        self,
        processor: Callable[[Any], dict[str, Any]] | None,
        format: str,
        caption_prompts: Sequence[str] | None = None,
        caption_field: str = "caption",
    ):
        self.processor = processor
        self.format = format
        self.caption_prompts = list(caption_prompts) if caption_prompts else None
        self.caption_field = caption_field

    def __call__(self, sample: dict[str, Any], processor: Callable[[Any], dict[str, Any]] | None = None) -> Any:
        decoded = decode_sample(sample, images=self.format != "text")
        record = to_record(decoded, self.format, self.caption_prompts, self.caption_field)
        return (processor or self.processor)(record)

    def prepare(self, sample: dict[str, Any], processor: Callable[[Any], dict[str, Any]] | None = None) -> Any:
        """The first half of the call, for processors that split theirs (`Processor.prepare` / `finish`): returns
        (processor, prepared), its `finish` still to run; other processors run whole: (None, result)."""
        decoded = decode_sample(sample, images=self.format != "text")
        record = to_record(decoded, self.format, self.caption_prompts, self.caption_field)
        processor = processor or self.processor
        if callable(getattr(processor, "prepare", None)) and callable(getattr(processor, "finish", None)):
            return processor, processor.prepare(record)
        return None, processor(record)


def mix_samples(
    streams: Sequence[Iterator[dict[str, Any]]], weights: Sequence[float], rng: random.Random
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(source index, sample), each draw from source i with probability weight_i / sum of live weights.

    Seeded (unlike webdataset's RandomMix, which draws from the global `random`); a source that ends is dropped
    and the rest keep their relative weights. One source: no draws at all.
    """
    live = [i for i, w in enumerate(weights) if w > 0]
    if len(live) == 1:
        for sample in streams[live[0]]:
            yield live[0], sample
        return
    while live:
        i = rng.choices(live, weights=[weights[k] for k in live])[0]
        try:
            yield i, next(streams[i])
        except StopIteration:
            live.remove(i)


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
            return resample_shards(urls, rng, failed)
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

    def next_samples(self, raw: Iterator[tuple[int, tuple[int, dict]]], processor: Any,
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
            samples, position = self.next_samples(raw, processor, handler)
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
