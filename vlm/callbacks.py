"""Callbacks that make a run survive being stopped: exact resume and saving on preemption.

- `ResumeState`: what Lightning's checkpoint lacks for an exact restart - every rank's RNG state (torch, CUDA,
  numpy, Python), and the logged metrics row of the checkpoint's own step (it is written after the checkpoint, so a
  kill in between would lose it). On resume it also carries the CSV log over: Lightning's CSV logger deletes an
  existing `metrics.csv`, so the runner moves it aside (`stash_csv_logs`) and the rows up to the checkpoint are
  written back ahead of the new ones.
- `PreemptionCheckpoint`: on the preemption signal (SLURM `--signal`, submitit's USR2) every rank finishes its step,
  a checkpoint is saved, and then the job is requeued by exactly one owner - submitit's handler when submitit started
  the job, otherwise `scontrol requeue` from rank 0 - and the run stops.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

log = logging.getLogger("vlm")

STASH_SUFFIX = ".before-resume"


# ---- RNG -------------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG states, as types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_objects(obj: Any) -> list[Any]:
    """`obj` from every rank, in rank order (`[obj]` when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


# ---- CSV logs --------------------------------------------------------------------------------------------------
def csv_log_files(loggers: list[Any]) -> list[Path]:
    from lightning.pytorch.loggers import CSVLogger

    return [Path(lg.log_dir) / "metrics.csv" for lg in loggers if isinstance(lg, CSVLogger)]


def stash_csv_logs(loggers: list[Any]) -> None:
    """Before a resumed run touches its CSV loggers (which delete `metrics.csv`), move their files aside."""
    for path in csv_log_files(loggers):
        if path.is_file():
            os.replace(path, path.with_name(path.name + STASH_SUFFIX))


def _restore_csv_rows(logger: Any, last_step: int, pending: dict[str, Any] | None) -> int:
    """Queue the stashed rows with step <= last_step (and the checkpoint's pending row if the file lacks it) into the
    logger, ahead of the new rows; returns the number of rows carried over."""
    path = Path(logger.log_dir) / "metrics.csv"
    stash = path.with_name(path.name + STASH_SUFFIX)
    rows: list[dict[str, Any]] = []
    if stash.is_file():
        with open(stash, newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get("step") not in (None, "") and int(float(row["step"])) <= last_step:
                    rows.append({k: _number(v) for k, v in row.items() if v not in (None, "")})
    if pending and not any(int(r["step"]) == pending["step"] and set(pending["metrics"]) <= set(r) for r in rows):
        rows.append({**pending["metrics"], "step": pending["step"]})
    writer = logger.experiment
    writer.metrics[:0] = rows
    if rows:
        writer.save()
    if stash.is_file():
        stash.unlink()
    return len(rows)


def _number(value: str) -> Any:
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number


class ResumeState(L.Callback):
    """Saves every rank's RNG state and the checkpoint step's pending log row; restores both on resume."""

    def __init__(self) -> None:
        self._loaded: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "ResumeState"

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        pending, log_step = None, None
        if trainer is not None and trainer.training:
            # the logging step of the batch being checkpointed: its rows are the last the resumed run will not write
            log_step = int(trainer.fit_loop.epoch_loop._batches_that_stepped)
            if trainer._logger_connector.should_update_logs:
                metrics = {k: float(v) for k, v in trainer._logger_connector.metrics["log"].items()}
                if metrics:
                    metrics.setdefault("epoch", trainer.current_epoch)
                    pending = {"step": log_step, "metrics": metrics}
        return {"rng": gather_objects(rng_state()), "pending_log": pending, "log_step": log_step}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # rows that callbacks logged directly (learning rate, data progress) sit in the loggers' buffers: write them
        # now, so the log on disk is complete up to this checkpoint even if the process dies right after it
        for logger in trainer.loggers:
            logger.save()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # RNG last: after the train iterator exists (creating it draws a seed from torch's RNG, and the interrupted
        # run had drawn it before its checkpoint) and after the first batch is prefetched, as it was at save time
        states = (self._loaded or {}).get("rng") or []
        if states:
            rank = _rank()
            set_rng_state(states[rank] if rank < len(states) else states[0])
        if not trainer.is_global_zero:
            self._loaded = None
            return
        from lightning.pytorch.loggers import CSVLogger

        resumed = self._loaded is not None
        last_step = (self._loaded or {}).get("log_step")
        if last_step is None:
            last_step = int(trainer.global_step) - 1 if resumed else -1
        pending = (self._loaded or {}).get("pending_log")
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                path = Path(logger.log_dir) / ("metrics.csv" + STASH_SUFFIX)
                if resumed or path.is_file():
                    n = _restore_csv_rows(logger, last_step, pending if resumed else None)
                    if n:
                        rank_zero_info(f"carried {n} logged rows (steps <= {last_step}) over from before the resume")
        self._loaded = None


    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # a resumed run that had nothing left to train never reached on_train_start: put its log back as it was
        if not trainer.is_global_zero:
            return
        for path in csv_log_files(trainer.loggers):
            stash = path.with_name(path.name + STASH_SUFFIX)
            if stash.is_file() and not path.exists():
                os.replace(stash, path)


# ---- preemption ----------------------------------------------------------------------------------------------------
def _signal(name: str | int) -> signal.Signals:
    if isinstance(name, int):
        return signal.Signals(name)
    name = str(name).upper()
    return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]


PREEMPTED_EXIT = 3  # the exit status of a stage stopped by the preemption signal (saved, requeued)


class Preempted(RuntimeError):
    """The run stopped on a preemption or stop signal after saving; the stage is not finished (no model directory).
    `exit_code`: 3 after the preemption signal, 128 + the signal's number after a stop signal (143 for SIGTERM)."""

    def __init__(self, message: str, exit_code: int = PREEMPTED_EXIT) -> None:
        super().__init__(message)
        self.exit_code = int(exit_code)


class PreemptionCheckpoint(L.Callback):
    """Save on the preemption signal, then requeue once; save on a stop signal (SIGTERM), then stop.

    The handler only records the signal. At the end of the current training step all ranks agree (a max-reduce of
    the flag), save `step-N.ckpt` (through the run's `StepCheckpoint` when there is one, else into `dirpath`) and
    stop. After the fit (`on_fit_end`) the job is requeued by exactly one owner: the handler that was installed for
    that signal before ours - submitit's checkpoint-and-requeue when submitit launched the job - or else, under SLURM
    with `requeue: true`, `scontrol requeue` from rank 0. The requeued job resumes with `resume=auto`. Lightning's
    own SLURM requeue is switched off by the runner (`vlm.distributed.cluster_plugins`). `preempted` tells the runner
    not to export a model directory.

    `stop_signals` (default SIGTERM, what `kill`, `scancel` and container runtimes send) are handled the same way up
    to the stop, but never requeue: the run saves the current step and the process exits with 128 + the signal's
    number (143), so neither a scheduler nor a script mistakes it for success, and `resume=auto` continues it.
    """

    def __init__(self, dirpath: str | os.PathLike, signals: list[str] | tuple[str, ...] = ("USR2",),
                 requeue: bool = True, stop_signals: list[str] | tuple[str, ...] = ("TERM",)) -> None:
        self.dirpath = Path(dirpath)
        self.stop_signals = [_signal(s) for s in stop_signals or ()]
        self.signals = [_signal(s) for s in signals] + [s for s in self.stop_signals if s not in
                                                          [_signal(x) for x in signals]]
        self.requeue = requeue
        self.preempted = False
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import threading

        self.preempted, self.received = False, None
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    @property
    def exit_code(self) -> int:
        """The process's exit status after this stop: 128 + signal for a stop signal, else `PREEMPTED_EXIT`."""
        if self.received in self.stop_signals:
            return 128 + int(self.received)
        return PREEMPTED_EXIT

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("received %s: saving a checkpoint at the end of this step", signal.Signals(signum).name)
        self.received = signal.Signals(signum)

    def _agreed(self, trainer: L.Trainer) -> bool:
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        return bool(flag.item() > 0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.preempted or not self._agreed(trainer):
            return
        from vlm.checkpointing import StepCheckpoint

        steps = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, StepCheckpoint)]
        if steps:
            steps[0].save_now(trainer)
        else:
            trainer.save_checkpoint(self.dirpath / f"step-{trainer.global_step:08d}.ckpt")
        rank_zero_info(f"preemption: checkpoint of step {trainer.global_step} saved; stopping")
        self.preempted = True
        trainer.should_stop = True
        # `should_stop` would also start a validation: run it only if this step was due for one anyway
        loop = trainer.fit_loop.epoch_loop
        every = trainer.val_check_batch
        due = isinstance(every, int) and every > 0 and (loop.total_batch_idx + 1) % every == 0
        if not due and hasattr(loop, "_skip_next_val"):
            loop._skip_next_val = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        previous = dict(self._previous)
        self._restore_handlers()
        if not self.preempted:
            return
        sig = self.received
        if sig in self.stop_signals:
            return  # stopped, not preempted: nothing to requeue
        handler = previous.get(sig) if sig is not None else None
        if callable(handler):
            log.warning("handing %s over to the handler installed before (%s)", sig.name,
                        getattr(handler, "__qualname__", handler))
            handler(int(sig), None)
            return
        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if job else os.environ.get("SLURM_JOB_ID")
        if self.requeue and job and trainer.is_global_zero:
            try:
                result = subprocess.call(["scontrol", "requeue", job])
            except OSError as error:  # e.g. inside a container without SLURM's tools: requeue from the sbatch script
                log.error("could not run scontrol requeue %s (%s); the job is not requeued", job, error)
            else:
                log.warning("scontrol requeue %s -> exit status %s", job, result)

    def _restore_handlers(self) -> None:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
