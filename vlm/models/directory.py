"""Shared by the model classes that write and read self-contained model directories (vlm.py, clip.py)."""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


def plain(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A config as a plain, resolved dict (what is written into a model directory)."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def swap_in(tmp: Path, directory: Path) -> None:
    """Replace `directory` by the finished `tmp` so a reader never sees a half-written model directory."""
    if not directory.exists():
        os.replace(tmp, directory)
        return
    old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def write_model_directory(
    model: Any, directory: str | os.PathLike, config: Mapping[str, Any], config_name: str, weights_name: str,
    tokenizer: Any = None,
) -> Path:
    """Config + safetensors weights (+ tokenizer), written into a temporary directory that is swapped in whole."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_model

    with staged_directory(directory) as tmp:
        OmegaConf.save(OmegaConf.create(dict(config)), tmp / config_name)
        save_model(model, str(tmp / weights_name), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(directory)


@contextlib.contextmanager
def staged_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary directory beside `directory` to write into; swapped in whole when the block ends, removed
    if it raises (so a reader never sees a half-written directory, and a failed write loses nothing)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        swap_in(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
