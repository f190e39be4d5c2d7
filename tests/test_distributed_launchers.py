"""Presets and launchers (issue 5): trainer presets build their strategies, `hydra/launcher=slurm` composes with the
job's shape (submitting needs `srun`, absent here), a requeued job finds the same run directory, SLURM ranks come
with Lightning's auto-requeue off, and `hydra/launcher=local` runs a sweep with one run directory per job."""
from __future__ import annotations

import pickle
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def test_trainer_presets_build_their_strategies() -> None:
    from lightning.pytorch.strategies import DDPStrategy

    from vlm.distributed import FSDP2Strategy

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        ddp = compose("train", overrides=["trainer=ddp"])
        fsdp = compose("train", overrides=["trainer=fsdp", "trainer.strategy.activation_checkpointing=true"])
    assert isinstance(instantiate(ddp.trainer.strategy), DDPStrategy)
    strategy = instantiate(fsdp.trainer.strategy)
    assert isinstance(strategy, FSDP2Strategy) and strategy.fsdp_options["activation_checkpointing"]
    assert fsdp.trainer.precision == "32-true" and fsdp.trainer.devices == 8  # bf16 lives in the FSDP policy
    assert OmegaConf.to_container(fsdp.trainer.plugins)[0]["_target_"] == "vlm.checkpointing.AtomicCheckpointIO"


def test_slurm_launcher_composes_with_the_job_shape(monkeypatch) -> None:
    import hydra_plugins.hydra_submitit_launcher  # noqa: F401  (in the dev extra: the SLURM path is tested in CI)
    monkeypatch.delenv("VLM_RESUME", raising=False)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "stage=sft", "model=llava_7b", "trainer=fsdp",
                                          "trainer.devices=8", "trainer.num_nodes=4", "hydra.launcher.partition=gpu",
                                          "hydra.launcher.account=vlm", "hydra.launcher.timeout_min=600"],
                      return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == (4, 8, 8)
    assert (launcher["partition"], launcher["account"], launcher["timeout_min"]) == ("gpu", "vlm", 600)
    assert launcher["cpus_per_task"] and launcher["mem_gb"] and launcher["max_num_timeout"] > 0
    assert "export VLM_RESUME=auto" in launcher["setup"]
    assert cfg.resume is None  # off the cluster nothing resumes by itself ...
    monkeypatch.setenv("VLM_RESUME", "auto")
    assert cfg.resume == "auto"  # ... in the sbatch script it does


def test_requeued_job_gets_the_same_run_directory() -> None:
    """submitit requeues by unpickling the launcher (holding the master config) and recomposing the job config with
    Hydra's `load_sweep_config`, which copies the resolver cache: `${now:...}` in the sweep dir must survive that."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        master = compose("train", overrides=["stage=align"], return_hydra_config=True)
        first = str(master.hydra.sweep.dir)
        time.sleep(1.1)
        requeued = pickle.loads(pickle.dumps(master))
        job = compose("train", overrides=["stage=align"], return_hydra_config=True)
        OmegaConf.copy_cache(from_config=requeued, to_config=job)
    assert str(job.hydra.sweep.dir) == first


def test_slurm_ranks_with_lightning_requeue_off(monkeypatch) -> None:
    import lightning as L
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from vlm.distributed import cluster_plugins

    assert cluster_plugins() == [] or SLURMEnvironment.detect()
    for key, value in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "train",
                       "SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                       "SLURM_NODELIST": "node1"}.items():
        monkeypatch.setenv(key, value)
    (env,) = cluster_plugins()
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False
    trainer = L.Trainer(accelerator="cpu", devices=1, plugins=[env], logger=False, enable_checkpointing=False)
    assert trainer._accelerator_connector.cluster_environment is env
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # an interactive allocation: Lightning's own environment
    assert cluster_plugins() == []


@pytest.mark.slow
def test_local_launcher_runs_a_sweep_with_a_run_directory_per_job(tmp_path: Path, monkeypatch, shapes) -> None:
    import runpy

    sweep = tmp_path / "sweep"
    monkeypatch.setenv("VLM_ROOT", str(tmp_path))  # train.py would set it to the checkout for the whole process
    monkeypatch.setattr(sys, "argv", [
        "train.py", "-m", "hydra/launcher=local", "stage=align", "seed=0,1", f"paths.data_dir={shapes.parent}",
        "debug=tiny_shapes", "data.batch_size=2", "trainer.val_check_interval=1000", "logger=none",
        f"hydra.sweep.dir={sweep}", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"])
    try:
        runpy.run_path(str(Path(CONF).parent / "train.py"), run_name="__main__")
    except SystemExit as done:  # Hydra exits only on errors
        assert done.code in (None, 0)
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0", "1"]
    for job, seed in zip(jobs, (0, 1)):
        assert (sweep / job / "model" / "model.safetensors").is_file()
        assert (sweep / job / "checkpoints" / "step-00000002.ckpt").is_file()
        assert OmegaConf.load(sweep / job / "config.yaml").seed == seed
    import csv

    with (sweep / "sweep.csv").open() as f:  # the sweep's summary: one row per job
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1"] and [r["run_dir"] for r in rows] == [str(sweep / j) for j in jobs]
    assert "seed=0" in rows[0]["overrides"].split() and "seed=1" in rows[1]["overrides"].split()
