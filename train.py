"""Train a stage, or with no arguments the quickstart recipe. See conf/train.yaml.

A stage stopped by the preemption signal (it saved a checkpoint first) exits with status 3 and no model directory,
one stopped by SIGTERM with 143 (128 + 15); run it again with resume=auto (hydra/launcher=slurm does so by itself).
"""

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from vlm.callbacks import Preempted
    from vlm.console import tidy_console
    from vlm.hub import friendly_errors
    from vlm.run import run_recipe, run_stage

    tidy_console()
    hydra_cfg = HydraConfig.get()
    with open_dict(cfg):
        cfg.run_dir = cfg.run_dir or hydra_cfg.runtime.output_dir
    try:
        with friendly_errors():  # a model that cannot be fetched: one short message (HYDRA_FULL_ERROR=1: traceback)
            if cfg.get("stage"):
                run_stage(cfg)
            else:
                run_recipe(cfg, user_overrides=list(hydra_cfg.overrides.task))
    except Preempted as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_code)


if __name__ == "__main__":
    # paths.root_dir: this checkout (its data/ and outputs/) from any working directory, unless VLM_ROOT says otherwise
    os.environ.setdefault("VLM_ROOT", str(Path(__file__).resolve().parent))
    main()
