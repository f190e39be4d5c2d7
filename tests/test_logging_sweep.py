"""logger=wandb keeps the CSV log and sends the resolved config; a sweep's summary table."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from vlm.data.synthetic.shapes import ensure_shapes
from vlm.sweep import write_summary

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def test_wandb_offline_keeps_metrics_csv_and_logs_the_config(tmp_path: Path, monkeypatch) -> None:
    wandb = pytest.importorskip("wandb")
    from vlm.run import run_stage

    sent: dict = {}  # the wandb run's own config, read when the stage closes the run
    finish = wandb.sdk.wandb_run.Run.finish

    def recording_finish(self, *args, **kwargs):
        sent.update(self.config.as_dict())
        return finish(self, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "finish", recording_finish)

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    shapes = ensure_shapes(tmp_path / "data" / "shapes", num_train=40, num_val=4, num_test=4, samples_per_shard=20)
    run_dir = tmp_path / "run"
    overrides = ["stage=align", "logger=wandb", "data=shards", f"data.train={shapes / 'train.txt'}",
                 f"paths.data_dir={shapes.parent}", f"run_dir={run_dir}", "trainer.max_steps=2",
                 "trainer.log_every_n_steps=1", "data.batch_size=4", "data.num_workers=0", "optim.lr=3e-4"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    assert sorted(cfg.logger) == ["csv", "wandb"]
    run_stage(cfg, overrides)
    with (run_dir / "logs" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("train/loss") for r in rows)  # the CSV log is still written beside wandb
    assert len(sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))) == 1  # for `wandb sync`
    assert sent["stage"]["name"] == "align" and sent["optim"]["lr"] == 3e-4 and sent["seed"] == 0
    assert sent["data"]["train"] == str(shapes / "train.txt") and sent["run_dir"] == str(run_dir)


def test_sweep_summary_has_a_row_per_job(tmp_path: Path) -> None:
    """Jobs as Hydra leaves them: `.hydra/overrides.yaml`, and a stage's metrics.csv or a recipe's metrics.json."""
    for job, (seed, loss) in enumerate([(0, "0.9"), (1, "0.7")]):
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(f"- stage=align\n- seed={seed}\n")
        (tmp_path / str(job) / "logs").mkdir()
        (tmp_path / str(job) / "logs" / "metrics.csv").write_text(
            f"step,train/loss,val/loss\n0,2.0,\n1,{loss},\n1,,{loss}1\n")
    (tmp_path / "2" / ".hydra").mkdir(parents=True)
    (tmp_path / "2" / ".hydra" / "overrides.yaml").write_text("- seed=2\n")
    (tmp_path / "2" / "metrics.json").write_text(json.dumps({"vqa/accuracy": 0.5}))
    path = write_summary(tmp_path)
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert path == tmp_path / "sweep.csv" and [r["job"] for r in rows] == ["0", "1", "2"]
    assert rows[0]["overrides"] == "stage=align seed=0" and rows[0]["run_dir"] == str((tmp_path / "0").resolve())
    assert (rows[0]["train/loss"], rows[0]["val/loss"], rows[1]["train/loss"]) == ("0.9", "0.91", "0.7")
    assert rows[2]["vqa/accuracy"] == "0.5" and rows[2]["train/loss"] == ""
