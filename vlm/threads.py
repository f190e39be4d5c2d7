"""Torch threads on a CPU run: `threads: null` (the default) leaves torch's choice, every core; `threads: auto` gives
the training process one core less per DataLoader worker; `threads: N` sets N.

Which pays depends on what else runs. Measured on a 2-core machine with one data worker: alone, the quickstart's
sft stage moved 1.45x and 1.52x faster with 2 threads than with 1 in 200-step runs, and the whole quickstart took
12:43 against 14:41, since the worker needs only ~20 ms of a ~250 ms step; with six other jobs on the machine,
2 threads moved at a seventh of the speed of 1 (30 against 210 clip steps in the same 2.5 minutes).
`OMP_NUM_THREADS`, when set, wins over `auto`.
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
