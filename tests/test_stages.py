"""Stages: what trains and what stays frozen, LoRA export, and a short end-to-end run of the whole recipe."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from vlm.data.collate import Collator
from vlm.data.formats import Record
from vlm.loading import build_processor, load_model
from vlm.models.vlm import VisionLanguageModel
from vlm.stages.generative import GenerativeStage

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.fixture(scope="module")
def shapes(make_shapes) -> Path:
    return make_shapes(num_train=300, num_val=40, num_test=40, samples_per_shard=100)


def tiny_model(shapes: Path):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.data_dir={shapes.parent}"])
    from omegaconf import OmegaConf

    return load_model(OmegaConf.to_container(cfg.model, resolve=True))


def batches(model, tokenizer, n: int = 2) -> list[dict]:
    from PIL import Image

    processor = build_processor(model, tokenizer)
    collate = Collator(tokenizer.pad_token_id, padding_side="right")
    rng = torch.Generator().manual_seed(0)
    out = []
    for b in range(n):
        records = []
        for i in range(4):
            color = tuple(int(c) for c in torch.randint(0, 255, (3,), generator=rng))
            records.append(Record(
                messages=[{"role": "user", "content": "<image>\nwhat color is the circle?"},
                          {"role": "assistant", "content": "red"}],
                images=[Image.new("RGB", (64, 64), color)], meta={"key": f"{b}-{i}"}))
        out.append(collate([processor(r) for r in records]))
    return out


def fit(stage: L.LightningModule, data: list[dict], steps: int) -> None:
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    ("trainable", "changed", "frozen"),
    [
        (["projector"], ["projector"], ["encoder", "decoder"]),
        (["projector", "decoder"], ["projector", "decoder"], ["encoder"]),
        (["decoder"], ["decoder"], ["encoder", "projector"]),
    ],
)
def test_freezing_per_stage(shapes: Path, trainable, changed, frozen) -> None:
    model, tokenizer = tiny_model(shapes)
    before = {part: snapshot(getattr(model, part)) for part in ("encoder", "projector", "decoder")}
    stage = GenerativeStage(model, trainable=trainable, optim={"lr": 1e-2, "warmup_steps": 0})
    fit(stage, batches(model, tokenizer), steps=2)
    for part in frozen:
        after = getattr(model, part).state_dict()
        assert all(torch.equal(before[part][k], after[k]) for k in after), f"{part} changed but is frozen"
    for part in changed:
        after = getattr(model, part).state_dict()
        assert any(not torch.equal(before[part][k], after[k]) for k in after), f"{part} did not train"


def test_unknown_trainable_part_is_an_error(shapes: Path) -> None:
    model, _ = tiny_model(shapes)
    with pytest.raises(ValueError, match="parts are"):
        GenerativeStage(model, trainable=["vision"])


def test_lora_trains_adapters_and_exports_merged(shapes: Path, tmp_path: Path) -> None:
    model, tokenizer = tiny_model(shapes)
    base = snapshot(model.decoder)
    stage = GenerativeStage(model, trainable=["projector", "decoder"], optim={"lr": 1e-2, "warmup_steps": 0},
                            lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    trained = [n for n, p in model.decoder.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    data = batches(model, tokenizer)
    fit(stage, data, steps=3)
    model.eval()
    batch = data[0]
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"]).logits
    stage.export(tmp_path / "model", tokenizer)
    assert (tmp_path / "model-lora-adapter" / "adapter_config.json").exists()
    loaded, _ = VisionLanguageModel.from_pretrained(tmp_path / "model")
    loaded.eval()
    with torch.no_grad():
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"]).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    merged = loaded.decoder.state_dict()
    assert any(not torch.equal(base[k], merged[k]) for k in base if k in merged), "LoRA changed nothing"


@pytest.mark.slow
def test_recipe_end_to_end(shapes: Path, tmp_path: Path) -> None:
    """Every stage of the quickstart recipe runs, hands its model on, and the evaluation writes metrics."""
    from vlm.run import run_recipe

    user = [f"paths.data_dir={shapes.parent}", "trainer.max_steps=3", "trainer.val_check_interval=3",
            "trainer.limit_val_batches=1", "data.batch_size=4", "data.num_workers=0",
            "data.prepare.num_train=300", "data.prepare.num_val=40", "data.prepare.num_test=40",
            "data.prepare.samples_per_shard=100"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[*user, f"run_dir={tmp_path}", "eval_overrides=['task.limit=8']"])
        metrics = run_recipe(cfg, user_overrides=user)
    for name in ("clip", "lm", "align", "sft"):
        assert (tmp_path / name / "model" / "model.safetensors").exists()
    # the clip stage's vision tower went into the VLM (lm trains the decoder only): same weights, except the
    # position table, resampled to the tiles' size when the clip stage ended at another (here its 16 px phase:
    # three steps never reach the 32 px one); the resolution only rises
    from safetensors.torch import load_file

    clip = {k: v for k, v in load_file(tmp_path / "clip" / "model" / "model.safetensors").items()
            if k.startswith("encoder.")}
    vlm = load_file(tmp_path / "lm" / "model" / "model.safetensors")
    assert clip and all(k in vlm for k in clip)
    for key, value in clip.items():
        if key.endswith("pos_embed"):
            assert vlm[key].shape[1] >= value.shape[1]
        else:
            torch.testing.assert_close(vlm[key], value, msg=lambda m, k=key: f"{k}: {m}")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    assert 0.0 <= saved["vqa/accuracy"] <= 1.0 and saved["vqa/count"] == 8
    assert 0.0 <= saved["zeroshot/top1"] <= 1.0 and saved["zeroshot/count"] > 0
    assert len((tmp_path / "eval" / "vqa" / "predictions.jsonl").read_text().splitlines()) == 8
