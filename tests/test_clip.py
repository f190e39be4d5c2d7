"""The clip stage: text towers, the dual encoder's model directory, a short stage run end to end (FLIP + unmasked
tail, logit-scale clamp), its evaluations, and the hand-over of its vision tower to a VLM at another resolution."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vlm.models.clip import ClipModel, ContrastiveHead
from vlm.models.text_encoders import TextEncoder

CONF = str(Path(__file__).resolve().parents[1] / "conf")
TINY_TEXT = {"model_type": "clip_text_model", "vocab_size": 50, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 16,
             "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


@pytest.fixture(scope="module")
def shapes(make_shapes) -> Path:
    return make_shapes(num_train=300, num_val=40, num_test=60, samples_per_shard=100)


@pytest.fixture(scope="module")
def cfg_for(compose_config):
    """`cfg_for(shapes, config, *overrides)`: conf/<config>.yaml on this module's shapes world."""
    return lambda shapes, config, *overrides: compose_config(config, [f"paths.data_dir={shapes.parent}", *overrides])


@pytest.fixture(scope="module")
def clip_run(shapes: Path, tmp_path_factory, cfg_for) -> Path:
    """A 6-step clip stage: FLIP at 0.5 for 4 steps, then 2 unmasked steps; a validation with both tasks at the end."""
    from vlm.run import run_stage

    run_dir = tmp_path_factory.mktemp("clip")
    cfg = cfg_for(shapes, "train", "stage=clip", f"run_dir={run_dir}", "trainer.max_steps=6",
                  "trainer.val_check_interval=6", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
                  "data.batch_size=8", "data.num_workers=0", "data.prepare.num_train=300",
                  "data.prepare.num_val=40", "data.prepare.num_test=60", "data.prepare.samples_per_shard=100",
                  "stage.mask_ratio=0.5", "stage.unmasked_steps=2", "optim.lr=1e-2",
                  "model.encoder.patch_size=4")  # 8x8 patches, whatever the quickstart's preset uses
    model_dir = run_stage(cfg)
    assert model_dir == run_dir / "model"
    return run_dir


# ---- text towers ------------------------------------------------------------------------------------------------
def test_eos_pooling_takes_the_last_attended_token() -> None:
    torch.manual_seed(0)
    text = TextEncoder(config=dict(TINY_TEXT), max_length=77).eval()
    assert text.max_length == 16  # capped by the position table
    ids = torch.tensor([[5, 6, 7, 2, 0, 0], [5, 6, 7, 8, 9, 2]])
    mask = (torch.arange(6) < torch.tensor([[4], [6]])).long()
    with torch.no_grad():
        hidden = text.model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = text(ids, mask)
    torch.testing.assert_close(pooled, torch.stack([hidden[0, 3], hidden[1, 5]]))


def test_text_tower_from_a_local_directory(tmp_path: Path) -> None:
    """`name_or_path` + pretrained: a saved CLIP text model, a whole CLIP checkpoint (its text tower), a BERT."""
    from transformers import BertConfig, BertModel, CLIPConfig, CLIPModel

    torch.manual_seed(0)
    full = CLIPModel(CLIPConfig(text_config={k: v for k, v in TINY_TEXT.items() if k != "model_type"},
                                vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                               "num_attention_heads": 2, "image_size": 32, "patch_size": 8}))
    full.save_pretrained(tmp_path / "clip")
    full.text_model.save_pretrained(tmp_path / "clip_text")
    ids = torch.tensor([[1, 5, 6, 2]])
    with torch.no_grad():
        reference = full.text_model(input_ids=ids).last_hidden_state[:, -1]
        for path in ("clip", "clip_text"):
            tower = TextEncoder(str(tmp_path / path), pretrained=True).eval()
            torch.testing.assert_close(tower(ids), reference)
            rebuilt = TextEncoder(**{k: v for k, v in tower.export_config().items() if k != "type"})
            assert type(rebuilt.model) is type(tower.model) and rebuilt.hidden_size == 32
    BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    bert = TextEncoder(str(tmp_path / "bert"), pretrained=True, pooling="cls").eval()
    assert bert.model.pooler is None  # unused pooler head removed (DDP would wait for its gradients)
    with torch.no_grad():
        torch.testing.assert_close(bert(ids), bert.model(input_ids=ids).last_hidden_state[:, 0])


# ---- the dual encoder -------------------------------------------------------------------------------------------
def test_head_initialisation_and_clamp() -> None:
    clip, siglip = ContrastiveHead("clip"), ContrastiveHead("siglip")
    assert clip.logit_scale.shape == (1,)
    assert float(clip.logit_scale.detach().exp()) == pytest.approx(1 / 0.07, rel=1e-6)
    assert clip.logit_bias is None
    assert float(siglip.logit_scale.detach().exp()) == pytest.approx(10.0)
    assert float(siglip.logit_bias.detach()) == -10.0
    with torch.no_grad():
        clip.logit_scale.fill_(7.0)
    clip.clamp_()
    assert float(clip.logit_scale.detach()) == pytest.approx(math.log(100.0))


def test_model_directory_round_trip(shapes: Path, tmp_path: Path, cfg_for) -> None:
    from vlm.data.clip_processor import ClipProcessor
    from vlm.loading import build_processor, load_model

    cfg = cfg_for(shapes, "train", "stage=clip", "model.loss=siglip")
    model, tokenizer = load_model(OmegaConf.to_container(cfg.model, resolve=True))
    assert isinstance(model, ClipModel) and model.loss_kind == "siglip"
    assert model.text_encoder.vocab_size == len(tokenizer)
    processor = build_processor(model, tokenizer)
    assert isinstance(processor, ClipProcessor)
    ids, mask = processor.texts(["a red circle at the top left.", "a blue square."])
    assert int(ids[0, int(mask[0].sum()) - 1]) == tokenizer.eos_token_id
    pixels = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        image, text = model(pixels, ids, mask)
    assert image.shape == text.shape == (2, 64)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(2))
    model.save_pretrained(tmp_path / "model", tokenizer)
    loaded, loaded_tokenizer = ClipModel.from_pretrained(tmp_path / "model")
    loaded.eval()
    with torch.no_grad():
        again = loaded(pixels, ids, mask)
    torch.testing.assert_close(again[0], image)
    torch.testing.assert_close(again[1], text)
    assert loaded.loss_kind == "siglip" and len(loaded_tokenizer) == len(tokenizer)


# ---- the stage end to end ---------------------------------------------------------------------------------------
def test_clip_stage_end_to_end(clip_run: Path) -> None:
    from safetensors.torch import load_file

    keys = load_file(str(clip_run / "model" / "model.safetensors")).keys()
    assert {k.split(".")[0] for k in keys} == {"encoder", "text_encoder", "image_proj", "text_proj", "head"}
    with open(clip_run / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    ratios = [float(r["train/mask_ratio"]) for r in rows if r.get("train/mask_ratio")]
    assert ratios == [0.5, 0.5, 0.5, 0.5, 0.0, 0.0]  # FLIP, then the unmasked tail
    scales = [float(r["train/logit_scale"]) for r in rows if r.get("train/logit_scale")]
    assert all(s <= 100.0 + 1e-4 for s in scales)
    final = {k: float(v) for r in rows for k, v in r.items() if k.startswith("val/") and v}
    for key in ("val/loss", "val/zeroshot/top1", "val/zeroshot/top5", "val/retrieval/i2t_recall@1",
                "val/retrieval/t2i_recall@10", "val/retrieval/mean_recall"):
        assert key in final
    assert all(0.0 <= v <= 1.0 for k, v in final.items() if k != "val/loss")


@pytest.mark.parametrize("task", ["zeroshot", "retrieval"])
def test_evaluate_tasks_on_the_clip_model(shapes: Path, clip_run: Path, tmp_path: Path, task: str, cfg_for) -> None:
    from vlm.run import run_evaluation

    metrics = run_evaluation(cfg_for(shapes, "evaluate", f"task={task}", f"model_dir={clip_run / 'model'}",
                                     f"run_dir={tmp_path}"))
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    if task == "zeroshot":
        labelled = sum(1 for s in _test_labels(shapes) if s is not None)
        assert metrics["zeroshot/count"] == labelled == len(lines) and labelled > 5
        assert 0.0 <= metrics["zeroshot/top1"] <= metrics["zeroshot/top5"] <= 1.0
    else:
        assert metrics["retrieval/count"] == 60 == len(lines)
        for d in ("i2t", "t2i"):
            r = [metrics[f"retrieval/{d}_recall@{k}"] for k in (1, 5, 10)]
            assert 0.0 <= r[0] <= r[1] <= r[2] <= 1.0


def _test_labels(shapes: Path) -> list:
    from vlm.data.tar import iterate_samples

    return [s["json"]["label"] for s in iterate_samples(str(shapes / "test.txt"), decode_images=False)]


def test_zeroshot_classifier_averages_normalised_templates(clip_run: Path) -> None:
    import torch.nn.functional as F

    from vlm.evaluation.zeroshot import ZeroShotTask

    model, _ = ClipModel.from_pretrained(clip_run / "model")
    model.eval()
    task = ZeroShotTask(classes={"red circle": "a red circle", "blue square": "a blue square"},
                        templates=["{}.", "a picture of {}."])
    processor = model.processor()
    with torch.no_grad():
        weights = task.classifier(model, processor)
        for c, name in enumerate(["a red circle", "a blue square"]):
            ids, mask = processor.texts([f"{name}.", f"a picture of {name}."])
            expected = F.normalize(model.encode_text(ids, mask).mean(0), dim=-1)
            torch.testing.assert_close(weights[c], expected)
    assert task.label_index({"shape": "square", "color": "blue"}) == 1 and task.label_index(None) is None
    with pytest.raises(ValueError, match="not one of"):
        task.label_index({"shape": "star", "color": "red"})


def test_retrieval_recall_by_hand() -> None:
    from vlm.evaluation.retrieval import RetrievalTask

    # 4 images x 4 captions; captions 2 and 3 are the same text
    pairs = [{"caption": c} for c in ("a", "b", "c", "c")]
    sim = torch.tensor([[0.9, 0.1, 0.2, 0.0],     # image 0: its caption first          -> hit@1
                        [0.8, 0.3, 0.1, 0.0],     # image 1: its caption 2nd            -> hit@2
                        [0.0, 0.1, 0.2, 0.9],     # image 2: caption 3 = same text "c"  -> hit@1
                        [0.85, 0.8, 0.7, 0.6]])   # image 3: "c" at ranks 3 and 4       -> hit@5 only
    metrics = RetrievalTask(ks=(1, 2, 5)).score(pairs, sim)
    assert metrics["retrieval/i2t_recall@1"] == pytest.approx(2 / 4)
    assert metrics["retrieval/i2t_recall@2"] == pytest.approx(3 / 4)
    assert metrics["retrieval/i2t_recall@5"] == 1.0
    # text -> image (columns): caption 0 -> image 0 first (hit); caption 1 -> image 1 second (hit@2);
    # "c" (captions 2, 3) -> images 2 or 3 first (hits)
    assert metrics["retrieval/t2i_recall@1"] == pytest.approx(3 / 4)
    assert metrics["retrieval/t2i_recall@2"] == 1.0
    assert metrics["retrieval/mean_recall"] == pytest.approx((2 / 4 + 3 / 4 + 1 + 3 / 4 + 1 + 1) / 6)


# ---- hand-over to a VLM at another resolution ---------------------------------------------------------------------
def test_clip_encoder_seeds_a_vlm_at_a_new_resolution(shapes: Path, clip_run: Path, cfg_for) -> None:
    from vlm.loading import load_model

    cfg = cfg_for(shapes, "train", "stage=align", f"model.encoder.init_from={clip_run / 'model'}",
                  "model.encoder.image_size=48", "model.encoder.patch_size=4", "model/projector=mlp2x_gelu")
    vlm, _ = load_model(OmegaConf.to_container(cfg.model, resolve=True))
    clip, _ = ClipModel.from_pretrained(clip_run / "model")
    assert (clip.encoder.image_size, clip.encoder.num_tokens) == (32, 64)
    assert vlm.encoder.image_size == 48 and vlm.encoder.grid == (12, 12) and vlm.tokens_per_image == 144
    theirs = clip.encoder.state_dict()
    for key, value in vlm.encoder.state_dict().items():
        if key == "model.pos_embed":
            assert value.shape[1] == 1 + 144 and theirs[key].shape[1] == 1 + 64  # resampled grid, CLS kept
            torch.testing.assert_close(value[:, 0], theirs[key][:, 0])
        else:
            torch.testing.assert_close(value, theirs[key], msg=lambda m, k=key: f"{k}: {m}")
    vlm.eval()
    with torch.no_grad():
        assert vlm.encode_images(torch.randn(2, 3, 48, 48)).shape[:2] == (2, 144)


# ---- a real CLIP's shapes on the meta device ----------------------------------------------------------------------
def test_clip_vit_b16_preset_matches_openai_clip(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m vlm.summary model=clip_vit_b16` counts exactly what transformers' CLIPModel has at these shapes."""
    from omegaconf import OmegaConf
    from transformers import CLIPConfig, CLIPModel

    from vlm.summary import main

    summary = main(["model=clip_vit_b16", "json=true"])
    counts = json.loads(capsys.readouterr().out)
    assert counts == summary
    vision = OmegaConf.load(Path(CONF) / "model" / "encoder" / "clip_vit_b16.yaml").config
    text = OmegaConf.load(Path(CONF) / "model" / "text_encoder" / "clip_b16.yaml").config
    text = {k: v for k, v in OmegaConf.to_container(text).items() if k != "model_type"}
    with torch.device("meta"):
        reference = CLIPModel(CLIPConfig(text_config=text, vision_config=OmegaConf.to_container(vision),
                                         projection_dim=512))
    assert counts["total"] == sum(p.numel() for p in reference.parameters()) == 149_620_737
    assert counts["encoder"] == sum(p.numel() for p in reference.vision_model.parameters())
    assert counts["text_encoder"] == sum(p.numel() for p in reference.text_model.parameters())
    assert counts["tokens_per_image"] == 196 and counts["stages"]["clip"]["params"] == counts["total"]


# ---- recipes: a clip run seeds the first VLM stage's encoder ------------------------------------------------------
def test_recipe_init_encoder_and_evaluation_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`init: encoder` hands the previous directory to model.encoder.init_from; `model:` picks an evaluation's stage."""
    import vlm.run as run

    seen: dict[str, list[str]] = {}

    def fake_stage(cfg, overrides=None):
        seen[Path(cfg.run_dir).name] = [f"init_from={cfg.init_from}",
                                        f"model.encoder.init_from={cfg.model.encoder.init_from}"]
        return Path(cfg.run_dir) / "model"

    def fake_evaluation(cfg, show=True):
        return {f"{cfg.task._target_.rsplit('.', 1)[-1]}/model_dir": str(cfg.model_dir)}

    monkeypatch.setattr(run, "run_stage", fake_stage)
    monkeypatch.setattr(run, "run_evaluation", fake_evaluation)
    recipe = {"name": "t", "stages": [{"name": "clip", "overrides": ["stage=clip"]},
                                      {"name": "lm", "init": "encoder", "overrides": ["stage=lm"]},
                                      {"name": "align", "overrides": ["stage=align"]},
                                      {"name": "fresh", "init": "none", "overrides": ["stage=align"]}],
              "evaluate": [{"name": "zeroshot", "model": "clip", "overrides": ["task=zeroshot"]},
                           {"name": "vqa", "overrides": ["task=vqa"]}]}
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"run_dir={tmp_path}"])
        cfg.recipe = OmegaConf.create(recipe)
        metrics = run.run_recipe(cfg)
        cfg.recipe.stages[1].init = "decoder"
        with pytest.raises(ValueError, match="init must be one of"):
            run.run_recipe(cfg)
    assert seen["clip"] == ["init_from=None", "model.encoder.init_from=None"]
    assert seen["lm"] == ["init_from=None", f"model.encoder.init_from={tmp_path / 'clip' / 'model'}"]
    assert seen["align"] == [f"init_from={tmp_path / 'lm' / 'model'}", "model.encoder.init_from=None"]
    assert seen["fresh"] == ["init_from=None", "model.encoder.init_from=None"]
    assert metrics == {"ZeroShotTask/model_dir": str(tmp_path / "clip" / "model"),
                       "VQATask/model_dir": str(tmp_path / "fresh" / "model")}
