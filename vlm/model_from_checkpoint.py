"""Checkpoint -> model directory: rebuild the stage from the run's config.yaml, load the checkpoint, export.

    python -m vlm.model_from_checkpoint checkpoint=RUN_DIR/checkpoints/step-00000500.ckpt out=DIR

The run's config.yaml is read as data: its model parts and stage go through vlm.models.registry, so it may name only
registered types (never code to import or call).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlm.checkpointing import apply_checkpoint, describe_base


def rebuild_specs(run_config: Mapping[str, Any], where: str) -> tuple[dict, dict, dict]:
    """(model, stage, optim) sections of a run's config.yaml, checked as data: the model's parts and the stage must
    be registered types (or their registered `_target_` paths), and no other `_target_` may appear in them. The
    stage's `eval_tasks` (validation only) are not needed to rebuild the weights and are left out."""
    from vlm.models.clip import PARTS as CLIP_PARTS
    from vlm.models.clip import is_clip_config
    from vlm.models.registry import check_file, refuse_targets, type_name
    from vlm.models.vlm import PARTS as VLM_PARTS

    model, stage = dict(run_config.get("model") or {}), dict(run_config.get("stage") or {})
    optim = dict(run_config.get("optim") or {})
    if not model or not stage:
        raise ValueError(f"{where} has no model or stage section: is it a training run's config.yaml?")
    check_file(model, CLIP_PARTS if is_clip_config(model) else VLM_PARTS, f"{where}: model")
    stage.pop("eval_tasks", None)
    type_name("stage", stage, f"{where}: stage")
    refuse_targets({k: v for k, v in stage.items() if k != "_target_"}, f"{where}: stage")
    refuse_targets(optim, f"{where}: optim")
    return model, stage, optim


def main(argv: list[str] | None = None) -> Path:
    """Checkpoint -> model directory: rebuild the stage from the run's config.yaml, load the checkpoint, export.

    The config is read as data (vlm.models.registry): it may name only registered part and stage types."""
    from omegaconf import OmegaConf

    from vlm.cli import REQUIRED, parse_options

    # config: the run's config.yaml (default: next to checkpoints/); trust_remote_code: let transformers run the code
    # of a base model that needs it (never read from the config)
    options = parse_options(argv, "vlm.model_from_checkpoint",
                            {"checkpoint": REQUIRED, "out": REQUIRED, "config": None, "trust_remote_code": False})
    checkpoint, out = Path(options["checkpoint"]), Path(options["out"])

    import lightning as L

    from vlm.loading import load_model
    from vlm.models.registry import build

    config = Path(options["config"] or checkpoint.resolve().parent.parent / "config.yaml")
    run_config = OmegaConf.to_container(OmegaConf.load(config))  # saved resolved; nothing is interpolated here
    model_cfg, stage_cfg, optim = rebuild_specs(run_config, str(config))
    L.seed_everything(int(run_config.get("seed") or 0), verbose=False)  # as the run did: a random base is rebuilt
    model, tokenizer = load_model(model_cfg, run_config.get("init_from"), run_config.get("init_model_keys") or (),
                                  trusted=False, trust_remote_code=options["trust_remote_code"])
    stage = build("stage", stage_cfg, f"{config}: stage", model=model, optim=optim)
    info = apply_checkpoint(stage, checkpoint)
    from vlm.stages.base import check_finite

    check_finite(stage.model, f"checkpoint {checkpoint}")
    directory = stage.export(out, tokenizer)
    print(f"{checkpoint} ({describe_base(info)}) -> {directory}")
    return directory


if __name__ == "__main__":
    main()
