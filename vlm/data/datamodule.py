"""LightningDataModule over webdataset shards: train/val loaders of padded batches, plus skip counts.

The Hydra config instantiates this with `_partial_: true`; the stage runner then calls it with `processor=...`
(the processor depends on the tokenizer and the model's tokens per image, which the data config cannot know).

One source (`train`, `val`, `format`) or a mixture (`sources: {name: {train, val, format, weight, ...}}`), each
source with its own shard shuffling and sample buffer, mixed per sample in proportion to the weights. The training
stream (`vlm.data.stream`) is a deterministic function of (seed, rank, worker, position); the module's
`state_dict()` records the batches served, so a resumed run fast-forwards to exactly where it stopped. With a
`resolution_schedule` each batch is built at its step's image size (the stage switches the encoder to it,
`vlm.stages.resolution`); the DataModule knows only `tokens_per_image_at`, a callable the runner passes. It also
logs skip counts.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch

from vlm.data.collate import Collator
from vlm.data.formats import FORMATS
from vlm.data.loader import StreamLoader, StreamProgress
from vlm.data.packing import packing_for
from vlm.data.resolution import ProcessorSizes, ResolutionSchedule
from vlm.data.shards import Source, dist_info, expand_shards
from vlm.data.skips import DEFAULT_MAX_CONSECUTIVE_SKIPS, SkipCounter
from vlm.data.stream import SampleFn, StreamDataset, StreamState
from vlm.data.tar import check_format

log = logging.getLogger(__name__)

ShardSpec = str | Sequence[str]
SOURCE_KEYS = {"train", "val", "format", "weight", "caption_prompts", "caption_field", "shuffle_buffer"}


def _init_worker(worker_id: int) -> None:
    """Forked workers inherit the parent's OpenMP pool state and can deadlock in torch ops: one thread each."""
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


class DataModule(L.LightningDataModule):
    """Batches of `{"input_ids","attention_mask","labels","pixel_values"?, "keys", "stream"}` (docs/architecture.md;
    `stream` says which worker stream, epoch, position and image size made the batch).

    train/val/test: brace or glob pattern, list of patterns, or `.txt` shard-list file (local files are checked
    here: a pattern matching nothing or a missing file is an error naming it, unless `allow_missing_shards`).
    sources: a mixture instead of `train`/`val`: `{name: {train, val?, format?, weight?, caption_prompts?,
    caption_field?, shuffle_buffer?}}`; `format` defaults to the stage's.
    resampled: infinite seeded training stream (set `max_steps`); otherwise epochs with shard shuffling
    (`shardshuffle`: any true value shuffles the shard list per epoch, identically on every rank).
    batches_per_epoch: virtual epochs of this many batches per rank (webdataset's `with_epoch`, counted in batches
    over all workers); None = unbounded (resampled) or one pass over the shards.
    resolution_schedule: `{step: image_size}` within the stage, e.g. `{0: 224, 1000: 336}` (optimizer steps).
    tokens_per_image_at: image size -> `<image>` tokens per tile at that size (the runner passes the model's,
    `vlm.stages.resolution.tokens_per_image_at`); needed only by a resolution schedule whose processor writes them.
    val_batches: cap on validation batches (the same first batches every time); None = the whole val set.
    caption_field: json field that holds the caption when a sample has no `txt` (img2dataset: "caption").
    packing: training rows of several whole samples, best-fit into `pack_length` tokens (default: the processor's
    `max_length`; samples longer go through its too-long policy) over a buffer of `pack_buffer` samples;
    `batch_size` then counts rows (`vlm.data.packing`). Validation stays unpacked.
    prepare: the config's data preparation node; accepted and ignored (the runner calls it before this).
    max_consecutive_skips: a stream (train or val, per worker) that skips this many samples in a row stops the run
    with `NoUsableSamples`, naming the reasons with counts; null = never. The first samples of each source are also
    checked at construction (`check_format`): data no sample of which fits the stage's format is an error at once.
    `test` is only stored (`test_urls`) for evaluation code, e.g. `iterate_samples(dm.test_urls)`.
    """

    def __init__(
        self,
        processor: Any,
        train: ShardSpec | None = None,
        val: ShardSpec | None = None,
        format: str = "conversation",
        batch_size: int = 32,
        num_workers: int = 1,
        shuffle_buffer: int = 1000,
        resampled: bool = True,
        seed: int = 0,
        val_batches: int | None = None,
        caption_prompts: Sequence[str] | None = None,
        test: ShardSpec | None = None,
        shardshuffle: int | bool = 100,
        prepare: Any = None,
        sources: Mapping[str, Mapping[str, Any]] | None = None,
        batches_per_epoch: int | None = None,
        resolution_schedule: Mapping[int | str, int] | None = None,
        caption_field: str = "caption",
        allow_missing_shards: bool = False,
        log_every_n_steps: int | None = None,
        max_consecutive_skips: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS,
        packing: bool = False,
        pack_length: int | None = None,
        pack_buffer: int = 512,
        tokens_per_image_at: Callable[[int], int] | None = None,
    ):
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"unknown data format {format!r}; expected one of {FORMATS}")
        self.packer = None
        if packing:
            processor, self.packer = packing_for(processor, pack_length, pack_buffer)
        self.processor = processor
        self.format = format
        self.caption_prompts = list(caption_prompts) if caption_prompts else None
        self.caption_field = caption_field
        self.allow_missing_shards = bool(allow_missing_shards)
        self.sources = self._sources(train, val, sources)
        self.train_urls = [u for s in self.sources for u in s.urls]
        self.val_sources = self._val_sources(val)
        self.val_urls = [u for s in self.val_sources for u in (s.val_urls or [])] or None
        self.test_urls = expand_shards(test, self.allow_missing_shards) if test else None
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.shuffle_buffer = int(shuffle_buffer)
        self.resampled = bool(resampled)
        self.seed = int(seed)
        self.val_batches = int(val_batches) if val_batches else None
        self.shardshuffle = shardshuffle
        self.batches_per_epoch = int(batches_per_epoch) if batches_per_epoch else None
        self.resolution_schedule = dict(resolution_schedule) if resolution_schedule else None
        self.log_every_n_steps = log_every_n_steps
        self.max_consecutive_skips = int(max_consecutive_skips) if max_consecutive_skips else None
        for source in self.sources:
            check_format(source.urls, source.format, source.caption_field, name=source.name)
        self.counters = {"train": SkipCounter(), "val": SkipCounter()}
        self.processors = ProcessorSizes(processor)
        self.schedule: ResolutionSchedule | None = None
        self.progress = StreamProgress(self.num_workers, self.batches_per_epoch)
        self.tokens_per_image_at = tokens_per_image_at
        self._restored: dict[str, Any] | None = None
        self._last_logged_step = -1

    # ------------------------------------------------------------ configuration

    def _sources(self, train: ShardSpec | None, val: ShardSpec | None,
                 sources: Mapping[str, Mapping[str, Any]] | None) -> list[Source]:
        if sources:
            if train:
                raise ValueError("give either `train` (one source) or `sources` (a mixture), not both")
            out = []
            for name, spec in dict(sources).items():
                if spec is None:  # a source switched off from the command line (data.sources.x=null)
                    continue
                spec = dict(spec)
                unknown = set(spec) - SOURCE_KEYS
                if unknown:
                    raise ValueError(f"source {name!r}: unknown keys {sorted(unknown)}; known: {sorted(SOURCE_KEYS)}")
                if not spec.get("train"):
                    raise ValueError(f"source {name!r} has no `train` shards")
                fmt = spec.get("format") or self.format
                if fmt not in FORMATS:
                    raise ValueError(f"source {name!r}: unknown data format {fmt!r}; expected one of {FORMATS}")
                weight = float(spec.get("weight", 1.0))
                if weight < 0:
                    raise ValueError(f"source {name!r}: negative weight {weight}")
                try:
                    urls = expand_shards(spec["train"], self.allow_missing_shards)
                    val_urls = expand_shards(spec["val"], self.allow_missing_shards) if spec.get("val") else None
                except FileNotFoundError as exc:
                    raise FileNotFoundError(f"data source {name!r}: {exc}") from exc
                prompts = spec.get("caption_prompts")
                out.append(Source(
                    name=str(name), urls=urls, format=fmt, weight=weight,
                    caption_prompts=list(prompts) if prompts else self.caption_prompts,
                    caption_field=spec.get("caption_field") or self.caption_field,
                    shuffle_buffer=spec.get("shuffle_buffer"), val_urls=val_urls,
                ))
            if not out or not any(s.weight > 0 for s in out):
                raise ValueError("a mixture needs at least one source with a positive weight")
            return out
        if not train:
            raise ValueError("no training data: set `train` (shards) or `sources` (a mixture)")
        return [Source(name="train", urls=expand_shards(train, self.allow_missing_shards), format=self.format,
                       caption_prompts=self.caption_prompts, caption_field=self.caption_field)]

    def _val_sources(self, val: ShardSpec | None) -> list[Source]:
        if val:
            return [Source(name="val", urls=[], format=self.format, caption_prompts=self.caption_prompts,
                           caption_field=self.caption_field, val_urls=expand_shards(val, self.allow_missing_shards))]
        return [s for s in self.sources if s.val_urls]

    def sample_fns(self, sources: Sequence[Source]) -> list[SampleFn]:
        """One sample function per source (its format, prompts and caption field; this module's processor)."""
        return [SampleFn(self.processor, s.format, s.caption_prompts, s.caption_field) for s in sources]

    @property
    def collator(self) -> Collator:
        if self.format == "preference":  # chosen rows, then rejected rows, each pair's images once
            from vlm.data.preference import PreferenceCollator

            return PreferenceCollator(self.processor.pad_token_id, padding_side="right")
        return Collator(self.processor.pad_token_id, padding_side="right")

    def dist(self) -> tuple[int, int]:
        """(rank, world size): the trainer's when attached, else torch.distributed's or the environment's."""
        trainer = self.trainer
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return dist_info()

    def _prepare_schedule(self) -> None:
        """Resolve the schedule (accumulation from the trainer) and tokens per image at each of its sizes."""
        if not self.resolution_schedule:
            return
        accumulate = int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1) if self.trainer else 1
        self.schedule = ResolutionSchedule(self.resolution_schedule, accumulate)
        if not hasattr(self.processor, "tokens_per_image"):
            return  # e.g. a dual encoder's processor: pixels only
        missing = [s for s in self.schedule.sizes if s != self.processors.base_size and s not in self.processors.tokens]
        if missing:
            if self.tokens_per_image_at is None:
                raise ValueError("a resolution schedule needs the tokens per image at each size: pass "
                                 "tokens_per_image_at=... (the runner passes the model's)")
            for size in missing:
                self.processors.tokens[size] = int(self.tokens_per_image_at(size))
            if self.processors.base_size is not None:
                self.processors.tokens[self.processors.base_size] = int(self.processor.tokens_per_image)

    def _check_shard_counts(self, world: int) -> None:
        if self.resampled:
            return
        readers = world * max(1, self.num_workers)
        for source in self.sources:
            if len(source.urls) < readers:
                log.warning("source %r has %d shards for %d ranks x %d workers: some read nothing and ranks may get "
                            "unequal batch counts (write more, smaller shards)", source.name, len(source.urls),
                            world, max(1, self.num_workers))

    def _loader_args(self, num_workers: int) -> dict[str, Any]:
        return dict(
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            worker_init_fn=_init_worker if num_workers > 0 else None,
        )

    # ------------------------------------------------------------ loaders

    def train_dataloader(self) -> StreamLoader:
        rank, world = self.dist()
        self._check_shard_counts(world)
        self._prepare_schedule()
        self._apply_restored(rank, world)
        if self.progress.served == 0 and self.trainer is not None and self.trainer.global_step > 0:
            # resumed from a checkpoint without data state: at least do not replay the same stream
            self.progress.served = int(self.trainer.global_step) * int(self.trainer.accumulate_grad_batches)
            self.progress.salt = self.progress.served + 1
            log.warning("resuming at step %d without data-stream state: the stream is re-seeded from the step "
                        "count (no exact continuation)", self.trainer.global_step)
        dataset = StreamDataset(
            self.sources, self.sample_fns(self.sources), self.processors, self.collator, self.counters["train"],
            StreamState(self.num_workers), self.batch_size, self.num_workers, train=True,
            resampled=self.resampled, seed=self.seed, shuffle_buffer=self.shuffle_buffer,
            shardshuffle=self.shardshuffle, schedule=self.schedule, rank=rank, world_size=world,
            max_consecutive_skips=self.max_consecutive_skips, packer=self.packer,
        )
        return StreamLoader(dataset, progress=self.progress, **self._loader_args(self.num_workers))

    def current_image_size(self) -> int | None:
        """The image size of the last served training batch (what the encoder is at), None = the processor's."""
        if self.schedule is None:
            return self.progress.image_size
        return self.schedule.size_for_batch(max(self.progress.served - 1, 0))

    def val_dataloader(self) -> Any:
        if not self.val_urls:
            return []
        self._prepare_schedule()
        # Every rank reads the whole validation set (the same batches): split by shard, a rank could get fewer
        # batches than another, or none (one val shard, two ranks), and under FSDP each forward is a collective,
        # so the ranks would wait on each other forever. Validation is capped (trainer.limit_val_batches) anyway.
        rank, world = 0, 1
        # more workers than shards would only idle; one pass in shard order keeps validation comparable
        workers = min(self.num_workers, len(self.val_urls))
        dataset = StreamDataset(
            self.val_sources, self.sample_fns(self.val_sources), self.processors, self.collator,
            self.counters["val"], StreamState(workers), self.batch_size, workers, train=False, seed=self.seed,
            rank=rank, world_size=world, max_consecutive_skips=self.max_consecutive_skips,
        )
        return StreamLoader(dataset, image_size=self.current_image_size, limit=self.val_batches,
                            **self._loader_args(workers))

    # ------------------------------------------------------------ serving, logging

    def record_batch(self, batch: Mapping[str, Any]) -> None:
        """Count one training batch as served (the Lightning hook does this; call it when looping by hand)."""
        meta = batch.get("stream")
        if isinstance(meta, Mapping):
            self.progress.record(dict(meta))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is None or not isinstance(batch, dict):
            return batch
        if trainer.training:
            self.record_batch(batch)
            self._log_progress(trainer)
        return batch

    def _log_progress(self, trainer: Any) -> None:
        step = int(trainer.global_step)
        every = int(self.log_every_n_steps or getattr(trainer, "log_every_n_steps", 50) or 50)
        if step % every or step == self._last_logged_step or not trainer.is_global_zero:
            return
        self._last_logged_step = step
        skipped = self.skipped("train")
        metrics: dict[str, float] = {"data/skipped": float(sum(skipped.values())),
                                     "data/epoch": float(self.progress.epoch)}
        metrics.update({f"data/skipped/{reason}": float(n) for reason, n in skipped.items()})
        if self.progress.image_size is not None:
            metrics["data/image_size"] = float(self.progress.image_size)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def teardown(self, stage: str) -> None:
        if stage == "fit" and (self.trainer is None or self.trainer.is_global_zero):
            name = getattr(getattr(self.trainer, "lightning_module", None), "stage_name", None)
            log.info("%sdata: %d training batches served (epoch %d); skipped samples: %s",
                     f"[{name}] " if name else "", self.progress.served,
                     max(self.progress.epoch, 0), self.skipped() or "none")

    def skipped(self, split: str | None = None) -> dict[str, int]:
        """Skipped samples by reason, for one split or summed over train and val (this rank's workers)."""
        if split is not None:
            return self.counters[split].counts()
        total: dict[str, int] = {}
        for counter in self.counters.values():
            for reason, n in counter.counts().items():
                total[reason] = total.get(reason, 0) + n
        return total

    # ------------------------------------------------------------ checkpoint state

    def _signature(self, world: int) -> dict[str, Any]:
        signature = {"num_workers": self.num_workers, "world_size": world, "batch_size": self.batch_size,
                     "seed": self.seed, "resampled": self.resampled, "batches_per_epoch": self.batches_per_epoch,
                     "sources": [[s.name, s.weight, len(s.urls)] for s in self.sources]}
        if self.packer is not None:  # a packed stream's positions are cursors: only as exact as the same packing
            signature["packing"] = self.packer.signature()
        return signature

    def state_dict(self) -> dict[str, Any]:
        """Batches served and, per rank and worker stream, the raw position reached (saved in checkpoints)."""
        rank, world = self.dist()
        state = {**self.progress.state_dict(), **self._signature(world)}
        positions = torch.tensor(self.progress.positions, dtype=torch.long)
        if world > 1 and self.trainer is not None:  # every rank dumps the checkpoint; rank 0 writes it
            gathered = self.trainer.strategy.all_gather(positions)
            state["positions_by_rank"] = gathered.reshape(world, -1).tolist()
        else:
            state["positions_by_rank"] = [positions.tolist()]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the stream position; applied when the training loader is built (rank known by then)."""
        self._restored = dict(state_dict)

    def _apply_restored(self, rank: int, world: int) -> None:
        state, self._restored = self._restored, None
        if state is None:
            return
        expected = self._signature(world)
        keys = [*expected, *(["packing"] if "packing" not in expected else [])]  # packed on one side only
        diffs = {k: (state.get(k), expected.get(k)) for k in keys if _plain(state.get(k)) != _plain(expected.get(k))}
        rows = state.get("positions_by_rank") or []
        positions = rows[rank] if rank < len(rows) else None
        exact = not diffs and positions is not None
        self.progress.load(state, positions, exact)
        if exact:
            log.info("data stream resumed exactly after %d batches (epoch %d)", self.progress.served,
                     self.progress.epoch)
        else:
            log.warning("data stream resumed after %d batches but not exactly (changed: %s): the rest of this epoch "
                        "is a new stream seeded from the batch count", self.progress.served,
                        diffs or "no positions for this rank")


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
