"""Train a stage, or with no arguments the quickstart recipe. See conf/train.yaml."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from vlm.run import run_recipe, run_stage

    hydra_cfg = HydraConfig.get()
    with open_dict(cfg):
        cfg.run_dir = cfg.run_dir or hydra_cfg.runtime.output_dir
    if cfg.get("stage"):
        run_stage(cfg)
    else:
        run_recipe(cfg, user_overrides=list(hydra_cfg.overrides.task))


if __name__ == "__main__":
    main()
