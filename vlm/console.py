"""What a run prints: each log line once, and no third-party notices the user cannot act on.

Hydra gives the root logger its handler (console and the run's log file). Lightning adds a console handler of its
own to the `lightning` logger when it is imported, so without this every Lightning INFO line is printed twice, bare
and with Hydra's prefix. `tidy_console` removes that handler, drops Lightning's advertising tips and repeats of the
same Lightning notice (the GPU/TPU lines, "Seed set to 0", printed again by every stage of a recipe), and silences
deprecation warnings raised inside third-party code (torch's pytree API used by Lightning) that no user setting
can change. Warnings raised by this project's own code are left alone.
"""

from __future__ import annotations

import logging
import warnings

# Notices that advertise other products; nothing in a run can act on them.
TIP_PREFIXES = ("💡 Tip:",)
# Deprecations raised inside libraries we call, not by anything the user configures.
UNACTIONABLE_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    # Lightning warns whenever the module has the hook and a DataModule is passed, although ours does not define it:
    # the stage switches the encoder's resolution there (vlm.stages.resolution), on purpose
    r"You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`",
)
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                     "lightning.fabric.utilities.seed", "lightning.pytorch.utilities.seed")


class QuietLightning(logging.Filter):
    """Drops Lightning's tips and any notice it already printed once in this process."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(TIP_PREFIXES):
            return False
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


_FILTER = QuietLightning()


class ConsoleFormatter(logging.Formatter):
    """`12:03:07 message`; `12:03:07 WARNING message` for anything above INFO (conf/hydra/job_logging/vlm.yaml)."""

    def __init__(self) -> None:
        super().__init__(datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno <= logging.INFO else f"{record.levelname} "
        return f"{self.formatTime(record, self.datefmt)} {level}{super().format(record)}"


def tidy_console() -> None:
    """Call once the entry point's logging is configured (inside the Hydra main); idempotent."""
    import lightning  # noqa: F401 - its import adds the console handler that is removed here

    lightning_logger = logging.getLogger("lightning")
    if logging.getLogger().handlers:  # Hydra's root handler prints everything that propagates to it
        for handler in list(lightning_logger.handlers):
            if type(handler) is logging.StreamHandler:
                lightning_logger.removeHandler(handler)
        lightning_logger.propagate = True
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for pattern in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
