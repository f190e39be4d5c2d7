"""Guards (issue 5): a NaN/inf loss stops the run naming the step and the batch keys, or skips that update by
config; clipping and accumulation are trainer config; the effective global batch size is reported at start."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from vlm.stages.base import NonFiniteLossError, effective_batch_report
from vlm.stages.generative import GenerativeStage


@pytest.fixture(scope="module")
def model_factory(shapes, compose_config):
    from omegaconf import OmegaConf

    from vlm.loading import load_model

    cfg = compose_config("train", [f"paths.data_dir={shapes.parent}"])
    torch.manual_seed(0)
    model = load_model(OmegaConf.to_container(cfg.model, resolve=True))[0]

    def build():
        return copy.deepcopy(model)
    return build


def batches(model, poisoned: int | None, n: int = 4) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    size = model.encoder.image_size
    out = []
    for b in range(n):
        ids = torch.randint(20, 200, (2, 6), generator=gen)
        ids = torch.cat([torch.full((2, model.tokens_per_image), model.image_token_id), ids], 1)
        labels = ids.clone()
        labels[:, : model.tokens_per_image] = -100
        pixels = torch.randn(2, 3, size, size, generator=gen)
        if b == poisoned:
            pixels[0, 0, 0, 0] = float("inf")
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                    "pixel_values": pixels, "keys": [f"shard-3/sample-{b}{i}" for i in range(2)]})
    return out


def fit(stage, data, steps: int, **trainer_kwargs) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs)
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return trainer


def test_nonfinite_loss_stops_naming_step_and_keys(model_factory) -> None:
    model = model_factory()
    stage = GenerativeStage(model, trainable=["projector"], optim={"lr": 1e-2, "warmup_steps": 0})
    with pytest.raises(NonFiniteLossError, match=r"at step 2 \(batch 2\); batch keys: shard-3/sample-20, "
                                                 r"shard-3/sample-21"):
        fit(stage, batches(model, poisoned=2), 4, gradient_clip_val=1.0)


def test_nonfinite_loss_skips_the_update_when_configured(model_factory) -> None:
    model = model_factory()
    stage = GenerativeStage(model, trainable=["projector"], optim={"lr": 1e-2, "warmup_steps": 0})
    stage.nonfinite_loss = "skip"
    before = {k: v.clone() for k, v in model.projector.state_dict().items()}
    trainer = fit(stage, batches(model, poisoned=1, n=5), 3, gradient_clip_val=1.0)
    assert stage.skipped_steps == 1 and trainer.global_step == 3  # 4 batches: one dropped, three updates
    after = model.projector.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after)


def test_nonfinite_loss_in_an_accumulated_micro_batch_skips_the_whole_step(model_factory) -> None:
    model = model_factory()
    stage = GenerativeStage(model, trainable=["projector"], optim={"lr": 1e-2, "warmup_steps": 0})
    stage.nonfinite_loss = "skip"
    trainer = fit(stage, batches(model, poisoned=0, n=6), 2, accumulate_grad_batches=2)
    assert stage.skipped_steps == 1 and trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in model.projector.parameters())


def test_effective_batch_size_report_and_trainer_config(compose_config) -> None:
    trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=16), accumulate_grad_batches=4,
                              strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 64}))
    assert effective_batch_report(trainer) == ("effective global batch size: 16 per device x 4 accumulation x 64 "
                                               "data-parallel ranks = 4096")
    cfg = compose_config("train", ["trainer=fsdp", "trainer.gradient_clip_val=0.5", "trainer.accumulate_grad_batches=8",
                                   "guards.nonfinite_loss=skip"])
    assert cfg.trainer.gradient_clip_val == 0.5 and cfg.trainer.accumulate_grad_batches == 8
    assert cfg.guards.nonfinite_loss == "skip"


# ---- issue 17: a diverged run never ends green --------------------------------------------------------------------
def test_lr_1e30_stops_in_both_modes_naming_the_step(model_factory) -> None:
    """The losses can stay finite for a step while the weights turn NaN: caught in both modes, at that update."""
    for mode in ("stop", "skip"):
        model = model_factory()
        stage = GenerativeStage(model, trainable=["projector", "decoder"], optim={"lr": 1e30, "warmup_steps": 0})
        stage.nonfinite_loss = mode
        with pytest.raises(NonFiniteLossError, match=r"weights became NaN/inf in the update of step 0"):
            fit(stage, batches(model, poisoned=None, n=6), 5, gradient_clip_val=1.0)


def test_a_skipped_update_does_not_count_toward_max_steps(model_factory) -> None:
    model = model_factory()
    stage = GenerativeStage(model, trainable=["projector"], optim={"lr": 1e-2, "warmup_steps": 0})
    stage.nonfinite_loss = "skip"
    seen: list[int] = []
    stage.on_train_batch_end = lambda outputs, batch, batch_idx: seen.append(batch_idx)
    trainer = fit(stage, batches(model, poisoned=1, n=8), 3, gradient_clip_val=1.0)
    assert stage.skipped_steps == 1 and trainer.global_step == 3
    assert seen == [0, 1, 2, 3]  # four batches for three updates


def test_consecutive_skips_stop_the_run(model_factory) -> None:
    model = model_factory()
    stage = GenerativeStage(model, trainable=["projector"], optim={"lr": 1e-2, "warmup_steps": 0})
    stage.nonfinite_loss, stage.max_consecutive_skips = "skip", 3
    data = batches(model, poisoned=0, n=1) * 10  # every batch poisoned
    with pytest.raises(NonFiniteLossError, match=r"3 updates in a row skipped \(guards.max_consecutive_skips=3\)"):
        fit(stage, data, 8)
    assert stage.skipped_steps == 3


def test_a_nonfinite_gradient_with_a_finite_loss_is_caught(model_factory) -> None:
    model = model_factory()
    stage = GenerativeStage(model, trainable=["projector"], optim={"lr": 1e-2, "warmup_steps": 0})
    hook = next(model.projector.parameters()).register_hook(lambda grad: grad * float("inf"))
    try:
        with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm at step 0"):
            fit(stage, batches(model, poisoned=None, n=3), 2, gradient_clip_val=1.0)
    finally:
        hook.remove()


def test_no_model_directory_from_nonfinite_weights(model_factory) -> None:
    from vlm.stages.base import check_finite

    model = model_factory()
    check_finite(model)
    with torch.no_grad():
        next(model.projector.parameters())[0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"1 tensors hold NaN/inf \(first: projector\."):
        check_finite(model)
