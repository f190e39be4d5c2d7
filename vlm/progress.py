"""One progress bar per stage: `[sft] 700/1800 steps`, counted in optimizer steps against `trainer.max_steps`.

Lightning's default bar counts batches of an epoch; on an endless (resampled) stream that reads `Epoch 0/-2`, and
every validation adds a bar of its own. Here validation runs silently under the training bar, whose postfix shows
the latest losses.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class StageProgressBar(TQDMProgressBar):
    """The stage's name, optimizer steps out of `max_steps` (batches of the epoch when `max_steps` is unset)."""

    BAR_FORMAT = "{desc}{percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}{postfix}]"

    def __init__(self, refresh_rate: int = 10) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=False)

    def _total(self, trainer: Any) -> int | None:
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        total = self.total_train_batches
        return int(total) if isinstance(total, int) or (isinstance(total, float) and total.is_integer()) else None

    def _name(self, pl_module: Any) -> str:
        return f"[{getattr(pl_module, 'stage_name', None) or type(pl_module).__name__}]"

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(desc=self._name(self.trainer.lightning_module), total=self._total(self.trainer),
                    initial=int(self.trainer.global_step), position=2 * self.process_position,
                    disable=self.is_disabled, leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0,
                    bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer: Any, *_: Any) -> None:
        bar = self.train_progress_bar
        if trainer.max_steps and trainer.max_steps > 0:
            return  # one bar for the whole stage, across (virtual) epochs
        bar.reset(total=self._total(trainer))
        bar.set_description(self._name(trainer.lightning_module))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        n = int(trainer.global_step) if trainer.max_steps and trainer.max_steps > 0 else batch_idx + 1
        if bar is not None and not bar.disable and (n % self.refresh_rate == 0 or n == bar.total) and n != bar.n:
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    # validation runs under the training bar: no bar of its own
    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def init_sanity_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
