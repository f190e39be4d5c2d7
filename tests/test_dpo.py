"""The dpo stage: the loss against the papers' formulas, the three reference modes, one image encoding per pair,
the preference format and collator, and the shapes world's pairs."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vlm.data.datamodule import DataModule
from vlm.data.formats import SkipSample, preference_record
from vlm.data.synthetic.preferences import ensure_preferences, read_scenes
from vlm.data.synthetic.shapes import ensure_shapes, questions
from vlm.loading import build_processor, load_model
from vlm.losses import dpo_loss
from vlm.stages.preference import DPOStage

CONF = str(Path(__file__).resolve().parents[1] / "conf")
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


# ---- the loss ---------------------------------------------------------------------------------------------------
# Two pairs, beta = 0.5. Pair 1: h = (-1 - -2) - (-3 - -2.5) = 1.5, beta h = 0.75. Pair 2: h = (-4 - -3) - (-2 - -3)
# = -2, beta h = -1. Rewards: 0.5 (policy - ref): chosen (0.5, -0.5), rejected (-0.25, 0.5).
PC, PR = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0])
RC, RR = torch.tensor([-2.0, -3.0]), torch.tensor([-2.5, -3.0])


@pytest.mark.parametrize("loss_type, smoothing, expected", [
    # -log sigmoid(x) = log(1 + e^-x): log(1 + e^-0.75) = 0.3868710061, log(1 + e^1) = 1.3132616875
    ("sigmoid", 0.0, [0.3868710061, 1.3132616875]),
    # cDPO, e = 0.1: 0.9 log(1 + e^-0.75) + 0.1 log(1 + e^0.75) = 0.3868710061 + 0.1 * 0.75;
    # 0.9 log(1 + e) + 0.1 log(1 + e^-1) = 1.3132616875 - 0.1 * 1
    ("sigmoid", 0.1, [0.4618710061, 1.2132616875]),
    # IPO: (h - 1/(2 beta))^2 = (1.5 - 1)^2, (-2 - 1)^2
    ("ipo", 0.0, [0.25, 9.0]),
    # SLiC hinge: max(0, 1 - beta h) = 1 - 0.75, 1 + 1
    ("hinge", 0.0, [0.25, 2.0]),
])
def test_dpo_loss_matches_the_papers_formulas(loss_type, smoothing, expected):
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type=loss_type, label_smoothing=smoothing)
    torch.testing.assert_close(losses, torch.tensor(expected), rtol=0, atol=1e-6)
    torch.testing.assert_close(chosen, torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(rejected, torch.tensor([-0.25, 0.5]))


def test_dpo_loss_hinge_is_zero_past_the_margin_and_rejects_bad_settings():
    losses, _, _ = dpo_loss(torch.tensor([0.0]), torch.tensor([-30.0]), torch.tensor([0.0]), torch.tensor([0.0]),
                            beta=0.1, loss_type="hinge")
    assert losses.item() == 0.0  # beta h = 3 > 1
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, label_smoothing=0.5)


def test_dpo_loss_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = PC.clone().requires_grad_(True), PR.clone().requires_grad_(True)
    dpo_loss(pc, pr, RC, RR, beta=0.5)[0].sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descending the loss raises chosen, lowers rejected


# ---- the stage on the shapes world ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = ensure_shapes(tmp_path_factory.mktemp("data") / "shapes", num_train=60, num_val=12, num_test=12,
                         samples_per_shard=30)
    ensure_preferences(root, samples_per_shard=40)
    return root


@pytest.fixture(scope="module")
def start(world):
    """A tiny tiled model (the quickstart's sft architecture) and its tokenizer; tests copy it."""
    torch.manual_seed(0)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.data_dir={world.parent}", "model=tiny_tiled"])
    return load_model(OmegaConf.to_container(cfg.model, resolve=True))


def pair_count(world: Path, split: str) -> int:
    """Pairs the shapes world's split gives: two of its questions (fewer if the scene has fewer), one object pair."""
    return sum(min(2, len(questions(meta["objects"]))) + 1 for _, _, meta in read_scenes(world, split))


def datamodule(world: Path, model, tokenizer, batch_size: int = 4, train: str = "train") -> DataModule:
    pref = world / "dpo" / "preference"
    return DataModule(build_processor(model, tokenizer), train=str(pref / f"{train}.txt"), val=str(pref / "val.txt"),
                      format="preference", batch_size=batch_size, num_workers=0)


def first_batch(world, model, tokenizer) -> dict:
    return next(iter(datamodule(world, model, tokenizer).val_dataloader()))


def test_preference_batch_layout(world, start):
    model, tokenizer = start
    batch = first_batch(world, model, tokenizer)
    pairs = len(batch["keys"])
    assert batch["input_ids"].shape[0] == 2 * pairs == 8
    tiles = batch["pixel_values"].shape[0]
    slots = int((batch["input_ids"] == model.image_token_id).sum())
    assert slots == 2 * tiles * model.tokens_per_image  # the pairs' images once, their placeholders in both rows
    chosen, rejected = batch["labels"][:pairs], batch["labels"][pairs:]
    for i in range(pairs):  # same prompt, different reply
        a, b = batch["input_ids"][i], batch["input_ids"][pairs + i]
        first = int((chosen[i] != -100).nonzero()[0])
        assert torch.equal(a[:first], b[:first])
        assert tokenizer.decode(a[chosen[i] != -100]) != tokenizer.decode(b[rejected[i] != -100])


def test_policy_equal_to_reference_gives_log_2_and_zero_rewards(world, start):
    model, tokenizer = copy.deepcopy(start[0]), start[1]
    stage = DPOStage(model, ["projector", "decoder"], reference="copy")
    loss, metrics = stage.preference_loss(first_batch(world, model, tokenizer))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/chosen"].item() == 0.0 and metrics["rewards/rejected"].item() == 0.0
    assert metrics["logps/chosen"].item() < 0


def test_shared_image_features_equal_encoding_each_row(world, start):
    """Splicing a pair's features into both rows gives the log-probs of running every row with its own images."""
    model, tokenizer = start
    batch = first_batch(world, model, tokenizer)
    with torch.no_grad():
        shared, _ = DPOStage.pair_logps(model, batch, model.encode_images(batch["pixel_values"]))
        pixels = torch.cat([batch["pixel_values"], batch["pixel_values"]])
        each, counts = model.reply_logps(batch["input_ids"], batch["labels"], batch["attention_mask"], pixels)
    torch.testing.assert_close(shared, each)
    assert (counts > 0).all()


def _perturb_adapters(stage: DPOStage) -> None:
    """Move the policy away from the start the same way in every stage (LoRA B starts at zero)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in sorted(stage.model.decoder.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("reference", ["copy", "adapter", "precomputed"])
def test_reference_modes_agree_and_encode_images_once_per_pair(world, start, tmp_path, reference):
    model, tokenizer = copy.deepcopy(start[0]), start[1]
    stage = DPOStage(model, ["decoder"], lora=LORA, reference=reference, reference_cache=str(tmp_path))
    dm = datamodule(world, model, tokenizer, train="val")  # a small first pass: the 36 val pairs (twice)
    if reference == "precomputed":
        stage.reference_logps = stage.precompute_reference(dm)
        assert stage.reference_model is None and len(stage.reference_logps) == pair_count(world, "val")
    batch = next(iter(dm.val_dataloader()))
    _perturb_adapters(stage)

    encoded = []
    encoders = [m.encoder for m in (stage.model, stage.reference_model) if m is not None]
    hooks = [e.register_forward_hook(lambda mod, args, out: encoded.append(args[0].shape[0])) for e in encoders]
    with torch.no_grad():
        loss, metrics = stage.preference_loss(batch)
    for hook in hooks:
        hook.remove()
    assert encoded == [batch["pixel_values"].shape[0]]  # one encoder call, each pair's tiles once

    # the reference is the starting model, whatever the mode: compare with it directly
    with torch.no_grad():
        ref, _ = DPOStage.pair_logps(start[0], batch, start[0].encode_images(batch["pixel_values"]))
        policy, _ = DPOStage.pair_logps(stage.model, batch, stage.model.encode_images(batch["pixel_values"]))
    pairs = len(batch["keys"])
    expected = dpo_loss(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:])[0].mean()
    assert not torch.allclose(policy, ref)  # the policy has moved
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    assert 0 <= metrics["rewards/accuracy"].item() <= 1


def test_precomputed_cache_is_reused_and_missing_keys_fail(world, start, tmp_path):
    model, tokenizer = copy.deepcopy(start[0]), start[1]
    stage = DPOStage(model, ["projector", "decoder"], reference="precomputed", reference_cache=str(tmp_path))
    dm = datamodule(world, model, tokenizer, batch_size=12, train="val")
    first = stage.precompute_reference(dm)
    (cache,) = tmp_path.glob("*.json")
    with torch.no_grad():  # a changed model must not change what the cache holds
        next(model.projector.parameters()).add_(1.0)
    assert stage.precompute_reference(dm) == first
    stage.reference_logps = {}
    with pytest.raises(KeyError, match="no precomputed reference"):
        stage.preference_loss(next(iter(dm.val_dataloader())))
    assert cache.is_file()


def test_reference_settings_are_checked(start):
    model = start[0]
    with pytest.raises(ValueError, match="LoRA"):
        DPOStage(model, ["decoder"], reference="adapter")
    with pytest.raises(ValueError, match="trainable"):
        DPOStage(copy.deepcopy(model), ["projector", "decoder"], lora=LORA, reference="adapter")
    with pytest.raises(ValueError, match="reference must be"):
        DPOStage(model, ["decoder"], reference="ema")


def test_sft_weight_adds_the_chosen_nll(world, start):
    model, tokenizer = copy.deepcopy(start[0]), start[1]
    batch = first_batch(world, model, tokenizer)
    plain = DPOStage(model, ["decoder"], reference="copy")
    weighted = DPOStage(model, ["decoder"], reference="copy", sft_weight=0.5)
    with torch.no_grad():
        loss, metrics = plain.preference_loss(batch)
        loss_w, _ = weighted.preference_loss(batch)
    torch.testing.assert_close(loss_w, loss + 0.5 * metrics["nll/chosen"])


# ---- the preference format --------------------------------------------------------------------------------------
def _sample(**json) -> dict:
    from PIL import Image

    return {"__key__": "k", "png": Image.new("RGB", (8, 8)), "json": json}


def test_preference_record_and_its_bad_pairs():
    prompt = [{"role": "user", "content": "<image>\nwhat colour?"}]
    record = preference_record(_sample(prompt=prompt, chosen="red", rejected="blue"))
    assert record.messages[-1] == {"role": "assistant", "content": "red"} and record.meta["rejected"] == "blue"
    assert len(record.images) == 1
    turn = preference_record(_sample(prompt="what?", chosen=[{"role": "assistant", "content": "a"}],
                                     rejected={"role": "assistant", "content": "b"}))
    assert turn.messages[0]["content"].startswith("<image>")  # an untagged image goes first, as in `conversation`
    bad = {
        "identical_replies": dict(prompt=prompt, chosen="red", rejected=" red"),
        "missing_reply": dict(prompt=prompt, chosen="red"),
        "missing_prompt": dict(chosen="red", rejected="blue"),
    }
    for reason, fields in bad.items():
        with pytest.raises(SkipSample) as info:
            preference_record(_sample(**fields))
        assert info.value.reason == reason
    no_image = {"__key__": "k", "json": dict(prompt=prompt, chosen="red", rejected="blue")}
    with pytest.raises(SkipSample) as info:
        preference_record(no_image)
    assert info.value.reason == "too_many_image_tags"


def test_shapes_preference_pairs_are_true_against_hallucinated(world):
    scenes = {key: meta for key, _, meta in read_scenes(world, "train")}
    pairs = list(read_scenes(world / "dpo" / "preference", "train"))
    assert len(pairs) == pair_count(world, "train")
    kinds = set()
    for key, _, meta in pairs:
        objects = scenes[key.rsplit("-p", 1)[0]]["objects"]
        question = meta["prompt"][0]["content"]
        kinds.add(meta["type"])
        assert meta["chosen"] != meta["rejected"]
        if meta["type"] == "count":
            assert meta["chosen"] == str(len(objects))
        if meta["type"] == "object":
            present = any(f"{o['color']} {o['shape']}" in question for o in objects)
            assert meta["chosen"] == ("yes" if present else "no")
        if meta["type"] == "color":
            assert meta["rejected"] not in {o["color"] for o in objects} or len({o["color"] for o in objects}) == 6
    assert {"count", "object"} <= kinds


# ---- converters -------------------------------------------------------------------------------------------------
def test_converters_from_trl_and_rlaif_v_skip_and_count_bad_pairs(tmp_path):
    import base64
    import io

    from PIL import Image

    from vlm.data.convert.__main__ import main
    from vlm.data.tar import iterate_samples

    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "a.png")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    Image.new("RGB", (8, 8), (0, 200, 0)).save(outside)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 200)).save(png, format="PNG")
    inline = {"bytes": base64.b64encode(png.getvalue()).decode()}
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]}]
    reply = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    trl = [
        {"prompt": prompt, "chosen": reply("red"), "rejected": reply("blue"), "images": ["a.png"]},
        {"prompt": prompt, "chosen": reply("blue"), "rejected": reply("red"), "images": [inline]},
        {"prompt": "no image here?", "chosen": "yes", "rejected": "no"},               # text only: fine
        {"prompt": prompt, "chosen": reply("red"), "rejected": reply("red"), "images": ["a.png"]},  # identical
        {"prompt": prompt, "chosen": reply("red"), "rejected": [], "images": ["a.png"]},  # missing reply
        {"prompt": prompt, "chosen": reply("red"), "rejected": reply("blue")},            # tag without image
        {"prompt": prompt, "chosen": reply("red"), "rejected": reply("blue"), "images": ["broken.jpg"]},
    ]
    (tmp_path / "trl.jsonl").write_text("\n".join(json.dumps(r) for r in trl))
    rlaif = [
        {"idx": 7, "image": "a.png", "question": "what colour?", "chosen": "red.", "rejected": "green."},
        {"image": "a.png", "question": "what colour?", "chosen": "red.", "rejected": None},  # missing reply
        {"image": None, "question": "what colour?", "chosen": "red.", "rejected": "blue."},  # no image
        {"image": "gone.png", "question": "what colour?", "chosen": "red.", "rejected": "blue."},
        {"image": str(outside), "question": "what colour?", "chosen": "red.", "rejected": "blue."},  # not in --images
    ]
    (tmp_path / "rlaif.json").write_text(json.dumps(rlaif))
    for source, name in (("trl", "trl.jsonl"), ("rlaif-v", "rlaif.json")):
        main(["preference", f"source={source}", f"input={tmp_path / name}", f"images={tmp_path}",
              f"out={tmp_path / source}", "quiet=true"])
    trl_stats = json.loads((tmp_path / "trl" / "train.stats.json").read_text())
    assert trl_stats["written"] == 3
    assert trl_stats["skipped"] == {"corrupt_image": 1, "identical_replies": 1, "missing_reply": 1,
                                    "too_many_image_tags": 1}
    rlaif_stats = json.loads((tmp_path / "rlaif-v" / "train.stats.json").read_text())
    assert rlaif_stats["written"] == 1
    assert rlaif_stats["skipped"] == {"missing_image": 2, "missing_reply": 1, "outside_images": 1}
    main(["preference", "source=rlaif-v", f"input={tmp_path / 'rlaif.json'}", f"images={tmp_path}",
          f"out={tmp_path / 'outside'}", "quiet=true", "allow_outside=true"])
    assert json.loads((tmp_path / "outside" / "train.stats.json").read_text())["written"] == 2

    records = []
    for source in ("trl", "rlaif-v"):
        for sample in iterate_samples(str(tmp_path / source / "train.txt")):
            try:
                records.append(preference_record(sample))
            except SkipSample as skip:
                records.append(skip.reason)
    assert [r.meta["rejected"] if not isinstance(r, str) else r for r in records] == ["blue", "red", "no", "green."]
    first, _, text_only, rlaif_record = records
    assert first.messages[0]["content"] == "<image>\nwhat colour?" and first.images[0].getpixel((0, 0)) == (200, 0, 0)
    assert records[1].images[0].getpixel((0, 0)) == (0, 0, 200) and text_only.images == []
    assert rlaif_record.messages[-1]["content"] == "red." and rlaif_record.meta["json"]["id"] == 7


# ---- end to end -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sft_then_dpo_recipe_on_the_shapes_world(tmp_path):
    """sft for a few steps, then `recipe=quickstart_dpo` from its model directory (reference=precomputed, so the
    first pass through fit runs too): a model directory, the reward logs, and VQA and POPE metrics."""
    import csv

    from vlm.run import run_recipe, run_stage

    data = [f"paths.data_dir={tmp_path / 'data'}", "data.prepare.num_train=40", "data.prepare.num_val=8",
            "data.prepare.num_test=8", "data.prepare.samples_per_shard=20", "data.batch_size=4",
            "data.num_workers=0", "trainer.limit_val_batches=1"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        sft = run_stage(compose("train", overrides=[
            *data, "stage=sft", "model=tiny_tiled", "trainer.max_steps=2", "trainer.val_check_interval=2",
            f"run_dir={tmp_path / 'sft'}"]))
        user = [*data, "trainer.max_steps=2", "trainer.val_check_interval=2", "stage.reference=precomputed",
                "trainer.log_every_n_steps=1"]
        cfg = compose("train", overrides=[*data, "recipe=quickstart_dpo", f"init_from={sft}",
                                          f"run_dir={tmp_path / 'dpo'}", "eval_overrides=['task.limit=8']"])
        metrics = run_recipe(cfg, user_overrides=user)
    assert (tmp_path / "dpo" / "dpo" / "model" / "model.safetensors").is_file()
    assert 0 <= metrics["pope/f1"] <= 1 and metrics["pope/count"] == 8 and 0 <= metrics["vqa/accuracy"] <= 1
    (cache,) = (tmp_path / "data" / "shapes" / "dpo" / "preference" / "reference-logps").glob("*.json")
    shapes = tmp_path / "data" / "shapes"
    assert len(json.loads(cache.read_text())["logps"]) == pair_count(shapes, "train") + pair_count(shapes, "val")
    logs = list((tmp_path / "dpo" / "dpo").rglob("metrics.csv"))
    columns = set(next(csv.reader(logs[0].open()))) if logs else set()
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
            "val/rewards/accuracy"} <= columns
