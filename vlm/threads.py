"""Torch threads on a CPU run: one core per DataLoader worker, the rest for the training process.

Torch starts as many threads as there are cores, and the data workers run beside them: on a 2-core machine the
quickstart's training process (2 threads) and its worker (1) asked for 3 cores. Measured on such a machine with
other jobs running: the run with 2 threads moved at a seventh of the speed of the same run with 1 (30 against
210 clip steps in the same 2.5 minutes), while a step's CPU time is the same; idle, the difference is smaller but
oversubscription never helps. `threads: auto` (conf/train.yaml) therefore gives the training process
cores - workers threads (at least 1). `OMP_NUM_THREADS`, when set, wins; `threads: N` sets N.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("vlm")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def training_threads(setting: int | str | None, num_workers: int, cores: int | None = None,
                     processes: int = 1) -> int | None:
    """Threads for each training process, or None to leave torch's own choice (`OMP_NUM_THREADS` set, or null).
    `processes`: training processes on this machine (DDP ranks), which share its cores."""
    if setting is None or (setting == "auto" and os.environ.get("OMP_NUM_THREADS")):
        return None
    if setting == "auto":
        return max(1, (cores or available_cores()) // max(1, processes) - max(0, int(num_workers)))
    threads = int(setting)
    if threads < 1:
        raise ValueError(f"threads must be auto, null or a positive number, got {setting!r}")
    return threads


def set_training_threads(setting: int | str | None, num_workers: int, accelerator: str | None,
                         devices: object = 1) -> None:
    """Apply `training_threads` on CPU runs (`trainer.accelerator: cpu`); GPU runs keep torch's default."""
    if accelerator != "cpu":
        return
    threads = training_threads(setting, num_workers, processes=devices if isinstance(devices, int) else 1)
    if threads is not None and threads != __import__("torch").get_num_threads():
        import torch

        torch.set_num_threads(threads)
        log.info("torch threads: %d (%d cores, %d data workers)", threads, available_cores(), num_workers)
