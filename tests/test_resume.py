"""Exact resume (issue 5): a stage interrupted four ways - SIGKILL right after a checkpoint, SIGKILL while writing
the next one, the preemption signal, and SIGTERM (issue 17) - and resumed each time with `resume=auto`, ends with
the weights and the logged curves of an uninterrupted run of the same length.

The stage is `sft` with LoRA dropout, so the RNG state matters; data come from the shapes stream with
`num_workers=0` (the data module's own state fast-forwards the stream). Runs that must die by SIGKILL are
subprocesses (tests/scripts/resume_run.py); the others run here.
"""
from __future__ import annotations

import csv
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm.checkpointing import list_checkpoints

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from launch import run_script  # noqa: E402
from resume_run import compose_config  # noqa: E402

STEPS = 8
RUN = ["stage=sft", f"trainer.max_steps={STEPS}", "callbacks.checkpoint.every_n_steps=2",
       "callbacks.checkpoint.keep_last=2", "stage.lora={r:4,alpha:8,dropout:0.1,target_modules:[q_proj,v_proj]}"]


def log_rows(run_dir: Path) -> dict[tuple[int, str], float]:
    rows = {}
    with open(run_dir / "logs" / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if value and key != "step":
                    assert (int(row["step"]), key) not in rows, f"{key} logged twice at step {row['step']}"
                    rows[(int(row["step"]), key)] = float(value)
    return rows


def run_here(shapes: Path, run_dir: Path, *extra: str) -> None:
    from vlm.run import run_stage

    run_stage(compose_config(shapes.parent, [*RUN, f"run_dir={run_dir}", *extra]))


@pytest.fixture
def one_thread():
    """The subprocesses run on one thread; in-process runs must too, or summation order differs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_killed_twice_and_preempted_run_resumes_to_the_uninterrupted_result(shapes: Path, tmp_path: Path,
                                                                            monkeypatch, one_thread) -> None:
    from vlm.stages.base import Stage

    reference, run = tmp_path / "reference", tmp_path / "interrupted"
    run_here(shapes, reference)

    # 1. SIGKILL after the checkpoint of step 4 was written, before step 4's metrics reached the log
    killed = run_script("resume_run.py", shapes.parent, *RUN, f"run_dir={run}",
                        env={"VLM_TEST_KILL_AFTER_CHECKPOINT": "4"}, check=False, timeout=180)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000002.ckpt", "step-00000004.ckpt"]

    # 2. resume=auto from step 4; SIGKILL halfway through writing step 6: the torn file never gets the real name
    killed = run_script("resume_run.py", shapes.parent, *RUN, f"run_dir={run}", "resume=auto",
                        env={"VLM_TEST_KILL_DURING_SAVE": "6"}, check=False, timeout=180)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert "Restoring states from the checkpoint path at" in killed.stdout and "step-00000004.ckpt" in killed.stdout
    assert [p.name for p in list_checkpoints(run / "checkpoints")][-1] == "step-00000004.ckpt"
    assert any(".tmp-" in p.name for p in (run / "checkpoints").iterdir())  # the torn write is still there

    # 3. resume=auto picks step 4 again (the torn one is removed); USR2 during step 6: save step 6, hand over to
    #    the launcher's handler (a stand-in for submitit's requeue), no model directory
    marker = tmp_path / "requeued"

    def stand_in_for_submitit(signum, frame):
        marker.write_text("requeue")
        raise SystemExit(3)

    original = Stage.on_train_batch_start

    def on_train_batch_start(self, batch, batch_idx):
        original(self, batch, batch_idx)
        if self.global_step == 5:
            signal.raise_signal(signal.SIGUSR2)

    monkeypatch.setattr(Stage, "on_train_batch_start", on_train_batch_start)
    previous = signal.signal(signal.SIGUSR2, stand_in_for_submitit)
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_here(shapes, run, "resume=auto")
    finally:
        signal.signal(signal.SIGUSR2, previous)
        monkeypatch.setattr(Stage, "on_train_batch_start", original)
    assert exit_info.value.code == 3 and marker.read_text() == "requeue"
    names = [p.name for p in list_checkpoints(run / "checkpoints")]
    assert names[-1] == "step-00000006.ckpt" and not any(".tmp-" in p.name for p in (run / "checkpoints").iterdir())
    assert not (run / "model").exists()

    # 4. resume=auto from step 6; SIGTERM during step 7: the checkpoint of step 7 is saved, the process exits 143
    #    (not 0), no model directory
    stopped = run_script("resume_run.py", shapes.parent, *RUN, f"run_dir={run}", "resume=auto",
                         env={"VLM_TEST_SIGTERM_AT_STEP": "6"}, check=False, timeout=180)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stdout[-3000:]
    assert "stopped on SIGTERM at step 7 after saving a checkpoint" in stopped.stdout
    assert [p.name for p in list_checkpoints(run / "checkpoints")][-1] == "step-00000007.ckpt"
    assert not (run / "model").exists()

    # 5. resume=auto from the SIGTERM checkpoint, to the end
    run_here(shapes, run, "resume=auto")

    expected, got = load_file(reference / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    expected_rows, got_rows = log_rows(reference), log_rows(run)
    assert sorted(got_rows) == sorted(expected_rows)  # every metric at every step, none twice, none missing
    losses = sorted(k for k in expected_rows if k[1] == "train/loss")
    assert [s for s, _ in losses] == list(range(STEPS))
    for key, value in expected_rows.items():
        if key[1] != "train/tokens_per_s":  # a wall-clock rate
            assert got_rows[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key

    # a stage checkpoint alone (plus the run's config.yaml for the base) gives the model directory back
    from vlm.model_from_checkpoint import main as checkpoint_to_model

    rebuilt = checkpoint_to_model([f"checkpoint={reference / 'checkpoints' / f'step-{STEPS:08d}.ckpt'}",
                                   f"out={tmp_path / 'from-checkpoint'}"])
    for key, value in load_file(rebuilt / "model.safetensors").items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
