"""Checkpoints (issue 5): atomic writes, `weights_only` loading, `resume=auto` lookup, trainable-only stage
checkpoints that record their base and refuse a stage they cannot fill, keep-last-N, save-and-requeue on the
preemption signal, and the LLaVA-7B align checkpoint estimate."""
from __future__ import annotations

import copy
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

import vlm.checkpointing as ckpt
from vlm.callbacks import PreemptionCheckpoint
from vlm.checkpointing import AtomicCheckpointIO, StepCheckpoint, find_resume_checkpoint, list_checkpoints
from vlm.stages.generative import GenerativeStage


# ---- files -------------------------------------------------------------------------------------------------------
def test_atomic_save_never_leaves_a_torn_checkpoint(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "step-00000002.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    before = target.read_bytes()

    def torn(obj, tmp):
        tmp.write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_write", torn)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, target)
    assert target.read_bytes() == before  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # and no temporary file is left behind
    assert torch.equal(io.load_checkpoint(target)["state_dict"]["w"], torch.ones(3))


class NotAWeight:
    def __reduce__(self):
        return (print, ("this would run at load time",))


def test_loading_is_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": NotAWeight()}, path)
    from vlm.checkpointing import CorruptCheckpoint

    with pytest.raises(CorruptCheckpoint, match="never loaded with code execution allowed"):  # issue 17: our message
        AtomicCheckpointIO().load_checkpoint(path)


def test_resume_auto_takes_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    d = tmp_path / "checkpoints"
    d.mkdir()
    for step in (2, 10):
        torch.save({}, d / f"step-{step:08d}.ckpt")
    (d / ".step-00000012.ckpt.tmp-1a2b3c4d").write_bytes(b"torn")          # a file write that was killed
    (d / "step-00000014.ckpt").mkdir()                                      # a sharded dir without its index
    (d / ".step-00000016.ckpt.partial").mkdir()                             # a sharded write still assembling
    sharded = d / "step-00000008.ckpt"
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"x")
    (sharded / "meta.pt").write_bytes(b"x")
    assert [p.name for p in list_checkpoints(d)] == ["step-00000002.ckpt", "step-00000008.ckpt",
                                                     "step-00000010.ckpt"]
    assert find_resume_checkpoint("auto", d) == d / "step-00000010.ckpt"
    assert find_resume_checkpoint("auto", tmp_path / "fresh") is None  # nothing yet: a fresh start
    assert find_resume_checkpoint(None, d) is None
    assert find_resume_checkpoint(str(sharded), d) == sharded
    with pytest.raises(FileNotFoundError):
        find_resume_checkpoint(str(d / "step-00000014.ckpt"), d)
    removed = {p.name for p in ckpt.remove_partials(d)}
    assert removed == {".step-00000012.ckpt.tmp-1a2b3c4d", ".step-00000016.ckpt.partial"}


# ---- stage checkpoints ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(shapes, compose_config):
    from omegaconf import OmegaConf

    from vlm.loading import load_model

    cfg = compose_config("train", [f"paths.data_dir={shapes.parent}"])
    torch.manual_seed(0)
    model = load_model(OmegaConf.to_container(cfg.model, resolve=True))[0]

    def build():
        return copy.deepcopy(model)
    return build


def make_batches(model, n: int = 4) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for b in range(n):
        ids = torch.randint(20, 200, (2, 6), generator=gen)
        ids = torch.cat([torch.full((2, model.tokens_per_image), model.image_token_id), ids], 1)
        labels = ids.clone()
        labels[:, : model.tokens_per_image] = -100
        size = model.encoder.image_size
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                    "pixel_values": torch.randn(2, 3, size, size, generator=gen), "keys": [f"b{b}-0", f"b{b}-1"]})
    return out


def fit(stage, batches, steps: int, root: Path, callbacks=(), ckpt_path=None) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, callbacks=list(callbacks),
                        plugins=[AtomicCheckpointIO()], enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root)
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None), ckpt_path=ckpt_path,
                weights_only=True)
    return trainer


def test_stage_checkpoint_holds_trainable_weights_and_its_base(tiny, tmp_path: Path) -> None:
    model = tiny()
    stage = GenerativeStage(model, trainable=["projector"], optim={"lr": 1e-2, "warmup_steps": 0}, name="align")
    stage.base_weights = {"init_from": "/models/lm", "seed": 0}
    saver = StepCheckpoint(tmp_path / "checkpoints", every_n_steps=1, keep_last=2)
    fit(stage, make_batches(model), 4, tmp_path, [saver])
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000003.ckpt",
                                                                            "step-00000004.ckpt"]
    checkpoint = torch.load(tmp_path / "checkpoints" / "step-00000004.ckpt", weights_only=True)
    weights = checkpoint["state_dict"]
    assert {k.split(".")[1] for k in weights} == {"projector"}
    n_params = sum(p.numel() for p in model.projector.parameters())
    assert sum(v.numel() for v in weights.values()) == n_params  # what vlm.summary counts for the stage
    info = checkpoint["vlm"]
    assert info["stage"] == "align" and info["trainable"] == ["projector"]
    assert info["base"] == {"init_from": "/models/lm", "seed": 0} and sorted(weights) == info["keys"]
    assert all(torch.equal(weights[k], v) for k, v in stage.state_dict().items() if k in weights)

    # resuming the same stage works (frozen weights come from the base it was built on) ...
    again = GenerativeStage(tiny(), trainable=["projector"], optim={"lr": 1e-2, "warmup_steps": 0}, name="align")
    again.base_weights = dict(stage.base_weights)
    fit(again, make_batches(model, 5), 5, tmp_path / "b", ckpt_path=tmp_path / "checkpoints" / "step-00000004.ckpt")
    # ... a stage that trains more than the checkpoint holds is refused, naming what is missing
    wider = GenerativeStage(tiny(), trainable=["projector", "decoder"], optim={"lr": 1e-2, "warmup_steps": 0})
    with pytest.raises(KeyError, match="lacks .* trainable weights.*decoder"):
        fit(wider, make_batches(model, 5), 5, tmp_path / "c", ckpt_path=tmp_path / "checkpoints" / "step-00000004.ckpt")


def test_preemption_signal_saves_then_requeues_once(tiny, tmp_path: Path, monkeypatch) -> None:
    """No launcher handler installed (plain sbatch + srun): the callback itself runs `scontrol requeue` on rank 0."""
    from vlm.stages.base import Stage

    calls = []
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setattr("vlm.callbacks.subprocess.call", lambda cmd: calls.append(cmd) or 0)
    original = Stage.on_train_batch_start

    def on_train_batch_start(self, batch, batch_idx):
        original(self, batch, batch_idx)
        if self.global_step == 1:
            signal.raise_signal(signal.SIGUSR2)

    monkeypatch.setattr(Stage, "on_train_batch_start", on_train_batch_start)
    previous = signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        model = tiny()
        stage = GenerativeStage(model, trainable=["projector"], optim={"lr": 1e-2, "warmup_steps": 0})
        saver = StepCheckpoint(tmp_path / "checkpoints", every_n_steps=100, keep_last=3, save_final=True)
        preemption = PreemptionCheckpoint(tmp_path / "checkpoints", signals=["USR2"])
        trainer = fit(stage, make_batches(model, 6), 6, tmp_path, [preemption, saver])
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL  # the handler in place before is back
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert preemption.preempted and trainer.global_step == 2  # the step in flight finished, then the run stopped
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000002.ckpt"]
    assert calls == [["scontrol", "requeue", "4242"]]


def test_llava_7b_align_checkpoint_estimate() -> None:
    """`python -m vlm.summary model=llava_7b`: the align checkpoint's weights (projector) vs the whole model."""
    from vlm.summary import format_summary, summarize

    summary = summarize(["model=llava_7b"])
    align = summary["stages"]["align"]
    assert align["trainable"] == ["projector"] and align["mb_fp32"] < 200
    assert 13_000 < summary["total_mb_bf16"] < 15_000
    table = format_summary(summary)
    assert "align" in table and "whole model in bf16" in table
