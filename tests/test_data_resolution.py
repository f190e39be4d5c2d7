"""Progressive resolution: the schedule, tokens per image at another size, and a real fit across a switch in which
the pixels, the `<image>` token count and the model agree at every step."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vlm.data.datamodule import DataModule
from vlm.data.resolution import ResolutionSchedule
from vlm.data.synthetic.shapes import ensure_shapes
from vlm.loading import build_processor, load_model
from vlm.stages.generative import GenerativeStage
from vlm.stages.resolution import tokens_per_image_at

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return ensure_shapes(tmp_path_factory.mktemp("res") / "shapes", num_train=60, num_val=8, num_test=4,
                         samples_per_shard=20, image_size=48)


def tiny(shapes: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.data_dir={shapes.parent}", "model.encoder.patch_size=4",
                                      "model/projector=mlp2x_gelu", *overrides])
    return load_model(OmegaConf.to_container(cfg.model, resolve=True))


def test_schedule() -> None:
    schedule = ResolutionSchedule({"0": 224, 1000: 336, 500: 224})
    assert [schedule.size_at_step(s) for s in (0, 999, 1000, 5000)] == [224, 224, 336, 336]
    assert schedule.sizes == [224, 336]
    accumulated = ResolutionSchedule({0: 224, 10: 336}, accumulate_grad_batches=4)
    assert accumulated.size_for_batch(39) == 224 and accumulated.size_for_batch(40) == 336
    with pytest.raises(ValueError, match="starts at step 0"):
        ResolutionSchedule({10: 336})


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "pixel_shuffle"])
def test_tokens_per_image_at_another_size(shapes: Path, projector: str) -> None:
    model, _ = tiny(shapes, f"model/projector={projector}")
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    predicted = {size: tokens_per_image_at(model, size) for size in (32, 48, 64)}
    assert all(torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())  # nothing was touched
    assert model.encoder.image_size == 32
    for size, tokens in predicted.items():
        model.encoder.set_image_size(size)
        assert model.tokens_per_image == tokens
        features = model.encode_images(torch.zeros(1, 3, size, size))
        assert features.shape[1] == tokens


def test_fit_across_a_switch(shapes: Path) -> None:
    """Step 0 at 32 px, from step 1 at 48 px, two workers building batches, two batches per step."""
    model, tokenizer = tiny(shapes)
    processor = build_processor(model, tokenizer)
    assert processor.tokens_per_image == 64
    dm = DataModule(processor, str(shapes / "train.txt"), val=str(shapes / "val.txt"), format="conversation",
                    batch_size=2, num_workers=2, shuffle_buffer=10, resolution_schedule={0: 32, 1: 48},
                    tokens_per_image_at=lambda size: tokens_per_image_at(model, size))
    stage = GenerativeStage(model, trainable=["encoder", "projector"], optim={"lr": 1e-3, "warmup_steps": 0})
    seen: list[tuple] = []

    class Check(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            enc = module.model.encoder
            images = batch["pixel_values"].shape[0]
            image_tokens = int((batch["input_ids"] == module.model.image_token_id).sum())
            seen.append((trainer.global_step, batch["stream"]["index"], enc.image_size,
                         tuple(batch["pixel_values"].shape[-2:]), image_tokens, images * module.model.tokens_per_image))

    trainer = L.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[Check()])
    trainer.fit(stage, datamodule=dm)

    assert [s[1] for s in seen] == list(range(4))
    assert [s[2] for s in seen] == [32, 32, 48, 48]  # step 0 = batches 0 and 1 (one from each worker)
    for step, _, size, pixels, image_tokens, expected in seen:
        assert pixels == (size, size) and image_tokens == expected
    assert seen[0][5] == 2 * 64 and seen[-1][5] == 2 * 144
    # the replaced position table (timm) is the one the optimizer trains now
    pos_embed = model.encoder.model.pos_embed
    assert pos_embed.shape[1] == 144 + model.encoder.num_prefix_tokens and pos_embed.requires_grad
    assert any(p is pos_embed for g in trainer.optimizers[0].param_groups for p in g["params"])
    # validation after the switch is built at the model's current size
    assert dm.current_image_size() == 48
    val = next(iter(dm.val_dataloader()))
    assert val["pixel_values"].shape[-1] == 48
    assert int((val["input_ids"] == model.image_token_id).sum()) == val["pixel_values"].shape[0] * 144
