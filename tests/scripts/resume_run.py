"""Run one stage through `vlm.run.run_stage`, optionally interrupted, for tests/test_resume.py.

    python tests/scripts/resume_run.py DATA_DIR [hydra overrides ...]

Interruptions, by environment variable (step = optimizer steps done):
  VLM_TEST_KILL_AFTER_CHECKPOINT=k  SIGKILL in the LightningModule's on_train_batch_end of step k, i.e. after the
                                    checkpoint of step k was written but before that step's metrics were logged
  VLM_TEST_KILL_DURING_SAVE=k       write half of checkpoint k's temporary file, then SIGKILL
  VLM_TEST_SIGNAL_AT_STEP=k         raise SIGUSR2 during step k; a stand-in for submitit's handler (installed before
                                    the run) writes VLM_TEST_MARKER and exits with status 3
  VLM_TEST_SIGTERM_AT_STEP=k        send this process SIGTERM during step k (it saves, stops and exits as train.py)
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def _env_step(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def install_interruptions() -> None:
    import vlm.checkpointing as ckpt
    from vlm.stages.base import Stage

    kill_after = _env_step("VLM_TEST_KILL_AFTER_CHECKPOINT")
    if kill_after is not None:
        def on_train_batch_end(self, outputs, batch, batch_idx):
            if self.global_step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        Stage.on_train_batch_end = on_train_batch_end

    kill_save = _env_step("VLM_TEST_KILL_DURING_SAVE")
    if kill_save is not None:
        original = ckpt._write

        def half_write(obj, tmp):
            if f"step-{kill_save:08d}" in tmp.name:
                import io
                buffer = io.BytesIO()
                torch.save(obj, buffer)
                with open(tmp, "wb") as handle:
                    handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                    handle.flush()
                    os.fsync(handle.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            original(obj, tmp)
        ckpt._write = half_write

    signal_at = _env_step("VLM_TEST_SIGNAL_AT_STEP")
    if signal_at is not None:
        marker = Path(os.environ["VLM_TEST_MARKER"])

        def fake_submitit(signum, frame):  # what submitit's checkpoint_and_try_requeue does on rank 0: requeue, exit
            marker.write_text(f"requeue after signal {signum}\n")
            sys.exit(3)
        signal.signal(signal.SIGUSR2, fake_submitit)

        _send_at_step(Stage, signal_at, signal.SIGUSR2)

    sigterm_at = _env_step("VLM_TEST_SIGTERM_AT_STEP")
    if sigterm_at is not None:
        _send_at_step(Stage, sigterm_at, signal.SIGTERM)


def _send_at_step(stage_class, step: int, sig: signal.Signals) -> None:
    """Make every stage send this process `sig` when a training batch starts at optimizer step `step`."""
    original_start = stage_class.on_train_batch_start

    def on_train_batch_start(self, batch, batch_idx):
        original_start(self, batch, batch_idx)
        if self.global_step == step:
            os.kill(os.getpid(), sig)
    stage_class.on_train_batch_start = on_train_batch_start


def compose_config(data_dir: str | Path, overrides: list[str]):
    """The run's config: the shapes data at the tests' sizes, in-process loading, a log row every step."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=[
            f"paths.data_dir={data_dir}", "debug=tiny_shapes", "trainer.val_check_interval=1000", *overrides])


def main() -> None:
    from vlm.callbacks import Preempted
    from vlm.run import run_stage

    data_dir, overrides = sys.argv[1], sys.argv[2:]
    install_interruptions()
    try:
        run_stage(compose_config(data_dir, overrides))
    except Preempted as stopped:  # as train.py does
        print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_code)


if __name__ == "__main__":
    main()
