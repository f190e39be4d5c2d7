"""Shared by the model classes that write and read self-contained model directories (vlm.py, clip.py)."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping


def plain(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A config as a plain, resolved dict (what is written into a model directory)."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def instantiate_part(spec: Mapping[str, Any], **kwargs: Any) -> Any:
    """Build a part from its `_target_` config, containers converted to plain Python."""
    from hydra.utils import instantiate

    return instantiate(spec, _convert_="all", **kwargs)


def swap_in(tmp: Path, directory: Path) -> None:
    """Replace `directory` by the finished `tmp` so a reader never sees a half-written model directory."""
    if not directory.exists():
        os.replace(tmp, directory)
        return
    old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
