"""Run one stage, a recipe of stages, or an evaluation, from composed Hydra configs.

This is the only place (with the entry points and `vlm.summary`) that knows about DictConfig: it instantiates the
parts and hands plain objects to the library.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("vlm")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _command_line() -> list[str]:
    """The command line's overrides when running under Hydra's main (none under the compose API)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    from hydra.utils import instantiate

    return [instantiate(node) for node in (group or {}).values() if node is not None]


def run_stage(cfg: DictConfig, overrides: Sequence[str] | None = None) -> Path:
    """Train one stage in `cfg.run_dir`, holding that directory's lock for the run (`vlm.run_lock`: a second run
    there fails at once, naming the holder); see `train_stage`. Config values of the wrong type are errors first,
    before any model is built (`vlm.config_check`)."""
    from lightning.pytorch.utilities import rank_zero_only

    from vlm.config_check import check_config_types
    from vlm.run_lock import RunDirLock

    check_config_types(cfg)
    if not cfg.get("stage"):
        raise ValueError("no stage chosen: pass stage=lm|align|sft|clip")
    with RunDirLock(Path(cfg.run_dir), enabled=rank_zero_only.rank == 0):
        return train_stage(cfg, overrides)


def train_stage(cfg: DictConfig, overrides: Sequence[str] | None = None) -> Path:
    """Train one stage and write its model directory; returns that directory.

    `overrides`: the overrides `cfg` was composed with (default: the command line's). With `init_from`, only the
    `model.` keys among them change the loaded model (`vlm.loading.adapt_loaded`); they are recorded in the run's
    config as `init_model_keys`.

    `resume`: null (fresh), `auto` (the newest complete checkpoint in `run_dir/checkpoints`, fresh if none) or a
    checkpoint path. Under FSDP2 the sharded weights are gathered and rank 0 writes the consolidated directory.
    A run stopped by the preemption signal raises `vlm.callbacks.Preempted` after saving (no model directory).
    """
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.utilities import rank_zero_only

    from vlm.callbacks import Preempted, PreemptionCheckpoint, stash_csv_logs
    from vlm.checkpointing import find_resume_checkpoint
    from vlm.distributed import cluster_plugins
    from vlm.loading import build_processor, explicit_model_keys, load_model
    from vlm.stages.resolution import tokens_per_image_at

    if not cfg.get("stage"):
        raise ValueError("no stage chosen: pass stage=lm|align|sft|clip")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rank0 = rank_zero_only.rank == 0  # from the launcher's environment (RANK, LOCAL_RANK, SLURM_PROCID)
    with open_dict(cfg):
        cfg.init_model_keys = explicit_model_keys(_command_line() if overrides is None else overrides)
    if rank0:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    ckpt_path = find_resume_checkpoint(cfg.get("resume"), run_dir / "checkpoints")
    from vlm.threads import set_training_threads

    set_training_threads(cfg.get("threads", "auto"), int(cfg.data.get("num_workers") or 0),
                         cfg.trainer.get("accelerator"), cfg.trainer.get("devices", 1))
    L.seed_everything(cfg.seed, workers=True)

    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    if not data_cfg.get("train") and not data_cfg.get("sources"):  # before any model is built
        raise ValueError("no training data: set data.train=PATTERN (shards or a .txt list), or data.sources")
    prepare = data_cfg.pop("prepare", None)
    if prepare:
        instantiate(prepare)
    if not cfg.get("init_from"):
        from vlm.data.bpe import warn_foreign_tokenizer

        warn_foreign_tokenizer(_plain(cfg.model), list(cfg.stage.get("trainable") or []), data_cfg)
    model, tokenizer = load_model(_plain(cfg.model), cfg.get("init_from"), cfg.init_model_keys)
    processor = build_processor(model, tokenizer)
    datamodule = instantiate(data_cfg)(processor=processor, tokens_per_image_at=partial(tokens_per_image_at, model))
    stage = instantiate(cfg.stage, model=model, optim=_plain(cfg.optim), _convert_="all")
    stage.base_weights = {"init_from": cfg.get("init_from"), "seed": cfg.seed, "model": _plain(cfg.model)}
    guards = cfg.get("guards") or {}
    stage.nonfinite_loss = guards.get("nonfinite_loss", "stop")
    stage.max_consecutive_skips = guards.get("max_consecutive_skips", 10)

    loggers = _instantiate_all(cfg.get("logger"))
    if ckpt_path is not None and rank0:
        stash_csv_logs(loggers)  # Lightning's CSV logger would delete the log of the steps before the resume
    for logger in loggers:  # the resolved config as the run's hyperparameters (wandb); CSV has config.yaml beside it
        if not isinstance(logger, CSVLogger):
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    plugins = [instantiate(p) for p in trainer_cfg.pop("plugins", None) or []] + cluster_plugins()
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if not loggers:  # logger=none: a learning-rate monitor would refuse to start
        from lightning.pytorch.callbacks import LearningRateMonitor

        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    trainer = instantiate(trainer_cfg, logger=loggers or False, callbacks=callbacks, plugins=plugins or None)
    if ckpt_path is not None:
        log.info("[%s] resuming from %s", stage.stage_name, ckpt_path)
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        trainer.fit(stage, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    except SIGTERMException:  # Lightning's own handler (before training started): a SystemExit with status 0
        raise Preempted(f"[{stage.stage_name}] stopped on SIGTERM before training started (nothing new saved); "
                        f"resume with resume=auto run_dir={run_dir}", 128 + 15) from None
    finally:
        for logger in loggers:  # wandb: close this stage's run (a recipe's next stage starts its own)
            finish = getattr(getattr(logger, "_experiment", None), "finish", None)
            if callable(finish):
                finish()

    stopped = [cb for cb in trainer.callbacks if isinstance(cb, PreemptionCheckpoint) and cb.preempted]
    if stopped:
        signal_name = stopped[0].received.name if stopped[0].received is not None else "the preemption signal"
        raise Preempted(f"[{stage.stage_name}] stopped on {signal_name} at step {trainer.global_step} after saving "
                        f"a checkpoint; resume with resume=auto run_dir={run_dir}", stopped[0].exit_code)
    model_dir = run_dir / "model"
    stage.gather_for_export()  # a collective under FSDP2; nothing otherwise
    if trainer.is_global_zero:
        from vlm.stages.base import check_finite

        check_finite(stage.model, f"[{stage.stage_name}] the trained model")
        stage.export(model_dir, tokenizer)
        skipped = datamodule.skipped() if hasattr(datamodule, "skipped") else {}
        log.info("[%s] model directory: %s; skipped samples: %s", stage.stage_name, model_dir, skipped or "none")
    trainer.strategy.barrier("export")
    return model_dir


def run_evaluation(cfg: DictConfig, show: bool = True) -> dict[str, float]:
    """Evaluate `cfg.model_dir` (or score `cfg.predictions`) on `cfg.task`; writes metrics.json and predictions.
    `show`: print the metrics (a recipe prints them once, in its summary)."""
    from hydra.utils import instantiate

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = instantiate(cfg.task, _convert_="all")
    metrics = task.run(model_dir=cfg.get("model_dir"), predictions=cfg.get("predictions"), out_dir=run_dir,
                       device=cfg.get("device", "auto"), dtype=cfg.get("dtype", "auto"),
                       trust_remote_code=bool(cfg.get("trust_remote_code", False)))
    write_metrics(metrics, run_dir / "metrics.json")
    if show:
        print(format_metrics(metrics))
        written = [name for name in ("metrics.json", "predictions.jsonl", "predictions.png")
                   if (run_dir / name).exists()]
        print(f"wrote {', '.join(written)} to {run_dir.resolve()}")
    return metrics


# How a recipe step starts from the previous step's model directory (the step's `init` key).
INIT_OVERRIDES = {"model": "init_from", "encoder": "model.encoder.init_from", "none": None}


def run_recipe(cfg: DictConfig, user_overrides: Sequence[str] = ()) -> dict[str, float]:
    """Run the recipe's stages in order, each from the previous model directory, then its evaluations.

    A step's `init` says how it starts from the previous directory: `model` (default, `init_from=`, the whole
    model), `encoder` (`model.encoder.init_from=`: only the vision tower, e.g. a clip run's, the rest built from
    the config) or `none`. An evaluation's `model` names the stage whose directory it evaluates (default: the last).
    """
    import time

    from hydra import compose

    started = time.monotonic()
    root = Path(cfg.run_dir)
    previous = cfg.get("init_from")  # where the first step starts from; each step then names its own
    user_overrides = [o for o in user_overrides if not o.lstrip("+~").startswith(("init_from=", "run_dir="))]
    stage_dirs: dict[str, str] = {}
    stage_seconds: dict[str, float] = {}
    for step in cfg.recipe.stages:
        init = step.get("init") or "model"
        if init not in INIT_OVERRIDES:
            raise ValueError(f"recipe step {step.name!r}: init must be one of {sorted(INIT_OVERRIDES)}, got {init!r}")
        overrides = [*step.overrides, *user_overrides, f"run_dir={root / step.name}"]
        if previous and INIT_OVERRIDES[init]:
            overrides.append(f"{INIT_OVERRIDES[init]}={previous}")
        log.info("recipe %s: stage %s with %s", cfg.recipe.name, step.name, overrides)
        stage_started = time.monotonic()
        previous = str(run_stage(compose("train", overrides=overrides), overrides))
        stage_dirs[step.name] = previous
        stage_seconds[step.name] = time.monotonic() - stage_started

    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:  # a multi-process trainer's other ranks: evaluations run once, on rank 0
        return {}
    metrics: dict[str, float] = {}
    path_overrides = [o for o in user_overrides if o.startswith("paths.")]
    for ev in cfg.recipe.get("evaluate") or []:
        source = ev.get("model")
        if source is not None and source not in stage_dirs:
            raise ValueError(f"recipe evaluation {ev.name!r}: model={source!r} is not a stage of {list(stage_dirs)}")
        model_dir = stage_dirs[source] if source else previous
        overrides = [*ev.overrides, *path_overrides, *cfg.get("eval_overrides", []),
                     f"model_dir={model_dir}", f"run_dir={root / 'eval' / ev.name}"]
        eval_started = time.monotonic()
        metrics.update(run_evaluation(compose("evaluate", overrides=overrides), show=False))
        stage_seconds[f"eval/{ev.name}"] = time.monotonic() - eval_started
    write_metrics(metrics, root / "metrics.json")
    (root / "stages.json").write_text(json.dumps(stage_dirs, indent=2))
    from vlm.recipe_report import write_recipe_report

    summary = write_recipe_report(root, stage_seconds, metrics, total_seconds=time.monotonic() - started)
    print(f"\nrecipe {cfg.recipe.name} finished; model: {previous}\n\n{summary}")
    return metrics


def write_metrics(metrics: dict[str, float], path: Path) -> None:
    """A flat JSON object, `<task>/<metric>` keys, written atomically."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(sorted(metrics.items())), indent=2))
    tmp.replace(path)


def format_metrics(metrics: dict[str, float]) -> str:
    if not metrics:
        return "(no metrics)"
    width = max(len(k) for k in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    from vlm.recipe_report import format_value

    lines += [f"{k:<{width}}  {format_value(k, v)}" for k, v in sorted(metrics.items())]
    return "\n".join(lines)
