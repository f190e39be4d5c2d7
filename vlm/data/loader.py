"""The main process's side of the training stream: the DataLoader over a `StreamDataset`, and the record of the
batches it served, from which the next iteration (or a resumed run) starts the workers exactly where they stopped.

`StreamLoader.__iter__` hands the workers, through shared memory (`StreamState`), where to start: epoch, first batch
index, and per logical stream the raw position to fast-forward to. `StreamProgress` is the DataModule's checkpoint
state.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader

from vlm.data.handover import unpack_batch
from vlm.data.skips import NoUsableSamples
from vlm.data.stream import StreamDataset, StreamState


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
