"""A sweep's summary: `sweep.csv` in the sweep folder, one row per job (its overrides, run directory, final metrics).

A Hydra callback (`hydra.callbacks.sweep_summary` in conf/train.yaml) writes it when the multirun ends, from what
each job left on disk, so it works the same for jobs run in this process (hydra/launcher=local) and for jobs run
elsewhere (SLURM through submitit). Final metrics: a recipe's `metrics.json`, else the last value of every column of
the stage's `logs/metrics.csv`.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

SUMMARY_NAME = "sweep.csv"


def final_metrics(run_dir: Path) -> dict[str, str]:
    """`metrics.json` (a recipe's evaluations) if present, else the last non-empty value of each metrics.csv column."""
    if (run_dir / "metrics.json").is_file():
        return {k: str(v) for k, v in json.loads((run_dir / "metrics.json").read_text()).items()}
    last: dict[str, str] = {}
    for path in sorted(run_dir.glob("**/logs/metrics.csv")):
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                last.update({k: v for k, v in row.items() if k and v not in (None, "")})
    return last


def job_overrides(job_dir: Path) -> list[str]:
    """The overrides Hydra recorded for a job (`.hydra/overrides.yaml`)."""
    from omegaconf import OmegaConf

    path = job_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def write_summary(sweep_dir: str | Path) -> Path | None:
    """One row per job folder (`0`, `1`, ...) of `sweep_dir`: job, overrides, run_dir, then the metrics' columns."""
    sweep_dir = Path(sweep_dir)
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not jobs:
        return None
    rows: list[dict[str, Any]] = []
    for job in jobs:
        rows.append({"job": job.name, "overrides": " ".join(job_overrides(job)), "run_dir": str(job.resolve()),
                     **final_metrics(job)})
    columns = list(dict.fromkeys(k for row in rows for k in row))
    path = sweep_dir / SUMMARY_NAME
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


class SweepSummary(Callback):
    """Writes `sweep.csv` into the sweep folder when a multirun ends."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        path = write_summary(config.hydra.sweep.dir)
        if path is not None:
            print(f"sweep summary: {path.resolve()}")
