"""Evaluate a model directory on a task, or score a predictions file. See conf/evaluate.yaml."""

import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from vlm.console import tidy_console
    from vlm.hub import friendly_errors
    from vlm.run import run_evaluation

    tidy_console()
    with open_dict(cfg):
        cfg.run_dir = cfg.run_dir or HydraConfig.get().runtime.output_dir
    with friendly_errors():
        run_evaluation(cfg)


if __name__ == "__main__":
    # paths.root_dir: this checkout (its data/ and outputs/) from any working directory, unless VLM_ROOT says otherwise
    os.environ.setdefault("VLM_ROOT", str(Path(__file__).resolve().parent))
    main()
