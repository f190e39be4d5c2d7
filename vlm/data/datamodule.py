"""LightningDataModule over webdataset shards: train/val loaders of padded batches, plus skip counts.

The Hydra config instantiates this with `_partial_: true`; the stage runner then calls it with `processor=...`
(the processor depends on the tokenizer and the model's tokens per image, which the data config cannot know).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from vlm.data.collate import Collator
from vlm.data.formats import FORMATS
from vlm.data.pipeline import SampleFn, SkipCounter, expand_shards, make_pipeline

ShardSpec = str | Sequence[str]


def _init_worker(worker_id: int) -> None:
    """Forked workers inherit the parent's OpenMP pool state and can deadlock in torch ops: one thread each."""
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


class DataModule(L.LightningDataModule):
    """Batches of `{"input_ids","attention_mask","labels","pixel_values"?, "keys"}` (docs/architecture.md).

    train/val/test: brace or glob pattern, list of patterns, or `.txt` shard-list file (local files are checked
    here). resampled: infinite seeded training stream (set `max_steps`); otherwise epochs with shard shuffling.
    val_batches: cap on validation batches (the same first batches every time); None = the whole val set.
    prepare: the config's data preparation node; accepted and ignored (the runner calls it before this).
    `test` is only stored (`test_urls`) for evaluation code, e.g. `iterate_samples(dm.test_urls)`.
    """

    def __init__(
        self,
        processor: Any,
        train: ShardSpec,
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
        shardshuffle: int = 100,
        prepare: Any = None,
    ):
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"unknown data format {format!r}; expected one of {FORMATS}")
        self.processor = processor
        self.format = format
        self.train_urls = expand_shards(train)
        self.val_urls = expand_shards(val) if val else None
        self.test_urls = expand_shards(test) if test else None
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.shuffle_buffer = int(shuffle_buffer)
        self.resampled = bool(resampled)
        self.seed = int(seed)
        self.val_batches = int(val_batches) if val_batches else None
        self.caption_prompts = list(caption_prompts) if caption_prompts else None
        self.shardshuffle = shardshuffle
        self.counters = {"train": SkipCounter(), "val": SkipCounter()}
        self._sample_fn = SampleFn(processor, format, self.caption_prompts)

    @property
    def collator(self) -> Collator:
        return Collator(self.processor.pad_token_id, padding_side="right")

    def _loader_args(self, num_workers: int) -> dict[str, Any]:
        return dict(
            batch_size=self.batch_size,
            collate_fn=self.collator,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            worker_init_fn=_init_worker if num_workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = make_pipeline(
            self.train_urls,
            self._sample_fn,
            self.counters["train"],
            resampled=self.resampled,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            shardshuffle=self.shardshuffle,
        )
        return DataLoader(dataset, **self._loader_args(self.num_workers))

    def val_dataloader(self) -> Any:
        if not self.val_urls:
            return []
        dataset = make_pipeline(
            self.val_urls, self._sample_fn, self.counters["val"], resampled=False, seed=self.seed,
            shuffle_buffer=0, shardshuffle=False,
        )
        # more workers than shards would only idle; one pass in shard order keeps validation comparable
        args = self._loader_args(min(self.num_workers, len(self.val_urls)))
        if self.val_batches:
            return wds.WebLoader(dataset, **args).slice(self.val_batches)
        return DataLoader(dataset, **args)

    def skipped(self, split: str | None = None) -> dict[str, int]:
        """Skipped samples by reason, for one split or summed over train and val."""
        if split is not None:
            return self.counters[split].counts()
        total: dict[str, int] = {}
        for counter in self.counters.values():
            for reason, n in counter.counts().items():
                total[reason] = total.get(reason, 0) + n
        return total
