"""Stage checkpoints: atomic, trainable weights only, found again by `resume=auto`.

- A checkpoint file is written to a hidden temporary name beside its target and renamed into place
  (`AtomicCheckpointIO`); a sharded one is a directory renamed into place once every rank has written
  (`vlm.distributed.FSDP2Strategy`). A half-written checkpoint therefore never carries a checkpoint's name, and
  `find_resume_checkpoint` never takes one for the newest.
- Frozen parameters are dropped (`Stage.on_save_checkpoint`): an `align` checkpoint of LLaVA-7B holds the projector
  and its optimizer state, not 14 GB of frozen towers. `checkpoint["vlm"]` records what the weights need - stage,
  trainable parts and keys, and the base (`init_from`, model config, seed) - and loading checks that every trainable
  key is there.
- Loading uses `torch.load(weights_only=True)`: nothing in a checkpoint can execute code.
- `StepCheckpoint`: every N optimizer steps, keep the last K, plus the final step.

A checkpoint becomes a model directory with `python -m vlm.model_from_checkpoint` (its own module, so that this one
needs nothing from the models and stages that use it).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger("vlm")

PARTIAL = ".partial"
_STEP = re.compile(r"step[-=](\d+)")
_METADATA = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME


class CorruptCheckpoint(RuntimeError):
    """A checkpoint file that cannot be read (torn, truncated, or not a checkpoint of tensors)."""


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """`torch.load(path, weights_only=True)`, with our own message when the file cannot be read: torch's advises
    retrying with `weights_only=False`, which would run whatever code the file holds."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as exc:  # noqa: BLE001 - zip, pickle and EOF errors of a damaged or foreign file
        raise CorruptCheckpoint(
            f"checkpoint {path} cannot be read ({type(exc).__name__}): it is damaged, cut short, or not a checkpoint "
            "of tensors. It is never loaded with code execution allowed; resume from another checkpoint "
            "(resume=auto takes the newest complete one, or pass resume=PATH)") from None


# ---- writing -------------------------------------------------------------------------------------------------
def partial_path(path: str | os.PathLike) -> Path:
    """Where the checkpoint `path` is assembled before it is renamed into place (hidden, never a candidate)."""
    path = Path(path)
    return path.parent / f".{path.name}{PARTIAL}"


def _write(obj: Any, tmp: Path) -> None:
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file in the same directory, fsync, then `os.replace` onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _write(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (best effort: some file systems cannot fsync a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, made atomic on save and `weights_only=True` on load."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} not found")
        return load_checkpoint_file(path, map_location=map_location or "cpu")


# ---- finding ---------------------------------------------------------------------------------------------------
def checkpoint_step(path: str | os.PathLike) -> int | None:
    match = _STEP.search(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: str | os.PathLike) -> bool:
    """A checkpoint file, or a sharded checkpoint directory with its DCP index and Lightning metadata."""
    path = Path(path)
    if path.name.startswith("."):
        return False
    if path.is_dir():
        return (path / ".metadata").is_file() and (path / _METADATA).is_file()
    return path.is_file() and path.stat().st_size > 0


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete `*.ckpt` checkpoints under `directory`, oldest first (by step in the name, then by time)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.suffix == ".ckpt" and is_complete(p)]

    def order(p: Path) -> tuple[int, float]:
        step = checkpoint_step(p)
        return (step if step is not None else -1, p.stat().st_mtime)

    return sorted(found, key=order)


def find_resume_checkpoint(resume: str | os.PathLike | None, checkpoint_dir: str | os.PathLike) -> Path | None:
    """`resume`: None/false -> None; `auto` -> the newest complete checkpoint in `checkpoint_dir` (None if there is
    none yet: a fresh start); anything else is a checkpoint path, which must exist."""
    if resume is None or resume is False or str(resume).lower() in ("", "none", "null", "false"):
        return None
    if str(resume).lower() == "auto":
        found = list_checkpoints(checkpoint_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not is_complete(path):
        raise FileNotFoundError(f"resume={resume}: not a complete checkpoint (file, or directory with .metadata)")
    return path


def remove_partials(directory: str | os.PathLike) -> list[Path]:
    """Delete leftovers of interrupted writes (`.*.partial`, `.*.tmp-*`) in `directory`."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for p in directory.iterdir():
            if p.name.startswith(".") and (p.name.endswith(PARTIAL) or ".tmp-" in p.name):
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


# ---- what a stage checkpoint holds -----------------------------------------------------------------------------
# Segments that wrappers insert into parameter names: activation checkpointing, torch.compile, FSDP1.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_key(name: str) -> str:
    """A parameter name as state dicts spell it (no checkpoint/compile/FSDP1 wrapper segments)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def trainable_keys(module: torch.nn.Module) -> list[str]:
    """State-dict keys of the trainable parameters (wrapper segments removed), tied duplicates included."""
    return [clean_key(n) for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad]


def check_trainable_keys(module: torch.nn.Module, stored: Iterable[str], source: Any, info: Mapping | None) -> None:
    """Raise if a trainable parameter of `module` has no weights in the checkpoint."""
    stored = set(stored)
    missing = [k for k in trainable_keys(module) if k not in stored]
    if missing:
        saved = (info or {}).get("trainable")
        raise KeyError(
            f"checkpoint {source} lacks {len(missing)} trainable weights of this stage (first: {missing[0]}); it was "
            f"saved by a stage training {saved}, this one trains {getattr(module, 'trainable', '?')}")


def describe_base(info: Mapping[str, Any] | None) -> str:
    info = info or {}
    base = info.get("base") or {}
    return f"init_from={base.get('init_from')!r}, seed={base.get('seed')!r}"


# ---- the callback ----------------------------------------------------------------------------------------------
class StepCheckpoint(ModelCheckpoint):
    """Checkpoint every `every_n_steps` optimizer steps as `step-NNNNNNNN.ckpt`, keep the newest `keep_last`
    (-1: all), and save the final step too (`save_final`). Leftovers of interrupted writes are removed at start."""

    def __init__(self, dirpath: str | os.PathLike, every_n_steps: int = 500, keep_last: int = 3,
                 save_final: bool = True, **kwargs: Any) -> None:
        if keep_last == 0:
            raise ValueError("keep_last must be >= 1, or -1 for all")
        # `step-00000500.ckpt`: no `=` in the name, so `resume=PATH` needs no quoting on the command line
        super().__init__(dirpath=dirpath, filename="step-{step:08d}", monitor="step", mode="max",
                         save_top_k=keep_last, every_n_train_steps=every_n_steps, save_last=False,
                         save_on_train_epoch_end=False, auto_insert_metric_name=False,
                         enable_version_counter=False, **kwargs)
        self.save_final = save_final

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath:
            for p in remove_partials(self.dirpath):
                log.warning("removed an incomplete checkpoint write: %s", p)
        trainer.strategy.barrier("StepCheckpoint.setup")

    def save_now(self, trainer: Any) -> None:
        """Save the current step (if not saved yet) under this callback's name and retention."""
        if trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = trainer.global_step

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.save_final and not trainer.sanity_checking:
            self.save_now(trainer)
        super().on_train_end(trainer, pl_module)


# ---- offline consolidation -------------------------------------------------------------------------------------
def load_trainable_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict of the LightningModule's saved keys, `vlm` info) from a checkpoint file or sharded directory,
    without a process group."""
    path = Path(path)
    if path.is_dir():
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        state = {}
        for key, item in meta.items():
            if key.startswith("state_dict.") and isinstance(item, TensorStorageMetadata):
                state[key.split(".", 1)[1]] = torch.empty(item.size, dtype=item.properties.dtype)
        loaded = {"state_dict": state}
        dcp_load(loaded, checkpoint_id=str(path), no_dist=True)
        info = torch.load(path / _METADATA, weights_only=True).get("vlm") or {}
        return loaded["state_dict"], info
    checkpoint = load_checkpoint_file(path)
    return checkpoint["state_dict"], checkpoint.get("vlm") or {}


def apply_checkpoint(stage: torch.nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load a stage checkpoint's trainable weights into a (single-process) stage built on the same base."""
    state, info = load_trainable_weights(path)
    check_trainable_keys(stage, state.keys(), path, info)
    missing, unexpected = stage.load_state_dict(state, strict=False)
    if unexpected:
        raise KeyError(f"checkpoint {path} has weights this stage lacks: {unexpected[:3]}")
    return info
