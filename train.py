"""Train a stage, or with no arguments the quickstart recipe. See conf/train.yaml.

A stage stopped by the preemption signal (it saved a checkpoint first) exits with status 3 and no model directory;
run it again with resume=auto (hydra/launcher=slurm does so by itself).
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

PREEMPTED_EXIT = 3


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from vlm.callbacks import Preempted
    from vlm.console import tidy_console
    from vlm.run import run_recipe, run_stage

    tidy_console()
    hydra_cfg = HydraConfig.get()
    with open_dict(cfg):
        cfg.run_dir = cfg.run_dir or hydra_cfg.runtime.output_dir
    try:
        if cfg.get("stage"):
            run_stage(cfg)
        else:
            run_recipe(cfg, user_overrides=list(hydra_cfg.overrides.task))
    except Preempted as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)


if __name__ == "__main__":
    main()
