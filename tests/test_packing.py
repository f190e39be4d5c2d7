"""Sequence packing (issue 13): packed rows give the unpacked batch's loss and gradients, samples in a row do not see
each other, positions restart at every sample, and a packed stream resumes exactly."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from vlm.data.collate import Collator
from vlm.data.packing import ROWS_PER_CHUNK, PackedCollator, best_fit, unit_length
from vlm.data.processor import IGNORE_INDEX
from vlm.models import attention
from vlm.models.vlm import VisionLanguageModel

VOCAB = 40


@pytest.fixture
def logs(caplog):
    """caplog at INFO (the logging state an earlier test changed is put back by conftest's restore_logging)."""
    import logging

    caplog.set_level(logging.INFO)
    return caplog


def tiny_model(attention_kind: str = "causal", implementation: str = "sdpa", lora: bool = False):
    """A 2-layer Llama behind a tiny ViT (16 px, 4 px patches: 16 tokens per image), fp32; ids 3..39 are text."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="w0")),
                                        unk_token="w0", pad_token="w1")
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    config = {
        "encoder": {"_target_": "vlm.models.encoders.timm_vit.TimmEncoder", "model_name": "vit_tiny_patch16_224",
                    "image_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2},
        "projector": {"_target_": "vlm.models.projectors.MLPProjector", "_partial_": True},
        "decoder": {"_target_": "vlm.models.decoders.build_decoder", "pretrained": False,
                    "attn_implementation": implementation,
                    "config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                               "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                               "max_position_embeddings": 256, "vocab_size": VOCAB}},
        "attention": attention_kind,
        "max_length": 128,
    }
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(config, tokenizer)
    if lora:
        from vlm.stages.generative import apply_lora

        model.decoder = apply_lora(model.decoder, {"r": 4, "dropout": 0.0})
        for name, param in model.decoder.named_parameters():  # non-zero adapters, so they matter
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
    return model.eval()


def make_sample(model, key: str, gen: torch.Generator, images: int, turns: int, words: int) -> dict:
    """`images` images first (with a word between), then `turns` (question, labelled answer) pairs."""
    ids, labels = [], []
    for _ in range(images):
        ids += [5] + [model.image_token_id] * model.tokens_per_image
        labels += [IGNORE_INDEX] * (1 + model.tokens_per_image)
    for _ in range(turns):
        question = torch.randint(3, VOCAB, (words,), generator=gen).tolist()
        answer = torch.randint(3, VOCAB, (max(1, words // 2),), generator=gen).tolist()
        ids += question + answer
        labels += [IGNORE_INDEX] * len(question) + answer
    sample = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "key": key}
    if images:
        sample["pixel_values"] = torch.randn(images, 3, 16, 16, generator=gen)
    return sample


def mixed_samples(model) -> list[dict]:
    """Very different lengths: text-only, one and two images, one to five turns."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(1, 1, 3), (0, 4, 9), (2, 1, 2), (0, 1, 2), (1, 5, 7), (1, 2, 4), (0, 2, 20), (1, 1, 1)]
    return [make_sample(model, f"s{i}", gen, *shape) for i, shape in enumerate(shapes)]


def packed_rows(samples: list[dict], capacity: int) -> list[list[dict]]:
    return [[samples[i] for i in row] for row in best_fit([unit_length(s) for s in samples], capacity)]


def loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model.next_token_loss(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                 batch.get("pixel_values"), batch.get("position_ids"))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("attention_kind", "implementation", "lora"), [
    ("causal", "sdpa", False), ("prefix", "sdpa", False), ("causal", "eager", True), ("prefix", "eager", True),
])
def test_packed_equals_unpacked_loss_and_gradients(attention_kind: str, implementation: str, lora: bool) -> None:
    model = tiny_model(attention_kind, implementation, lora)
    samples = mixed_samples(model)
    rows = packed_rows(samples, 96)
    assert len(rows) < len(samples) and max(len(r) for r in rows) >= 3  # several samples share rows
    loss, grads = loss_and_grads(model, Collator(1)(samples))
    packed = PackedCollator(1)([list(r) for r in rows])
    packed_loss, packed_grads = loss_and_grads(model, packed)
    torch.testing.assert_close(packed_loss, loss, rtol=0, atol=1e-5)
    assert grads.keys() == packed_grads.keys() and len(grads) > 4
    if lora:
        assert all("lora" in n or not n.startswith("decoder") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_varlen_path_is_exact_and_sends_no_mask(monkeypatch) -> None:
    """The flash-attention path (padding-free, boundaries from the position ids, no mask), run here on SDPA, where
    transformers isolates a flattened packed row from its position ids too."""
    model = tiny_model("causal", "sdpa")
    samples = mixed_samples(model)
    loss, grads = loss_and_grads(model, Collator(1)(samples))
    monkeypatch.setattr(model, "isolation", lambda: attention.VARLEN)
    seen = {}
    original = model.decoder.forward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(model.decoder, "forward", spy)
    packed = PackedCollator(1)(packed_rows(samples, 96))
    packed_loss, packed_grads = loss_and_grads(model, packed)
    real = int(packed["attention_mask"].sum())
    assert seen["attention_mask"] is None and seen["inputs_embeds"].shape[:2] == (1, real)
    assert seen["cu_seq_lens_q"].tolist()[-1] == real and len(seen["cu_seq_lens_q"]) == len(samples) + 1
    torch.testing.assert_close(packed_loss, loss, rtol=0, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_prefix_attention_refuses_the_varlen_path(monkeypatch) -> None:
    model = tiny_model("prefix")
    monkeypatch.setattr(attention, "attn_implementation", lambda decoder: "flash_attention_2")
    monkeypatch.setattr("vlm.models.vlm.decoder_isolation", attention.isolation)
    with pytest.raises(ValueError, match="causal only"):
        model.isolation()


@pytest.mark.parametrize("attention_kind", ["causal", "prefix"])
def test_changing_one_sample_leaves_its_row_neighbours_unchanged(attention_kind: str) -> None:
    model = tiny_model(attention_kind)
    samples = mixed_samples(model)
    row = [samples[2], samples[0], samples[5]]  # image-bearing neighbours on both sides of the changed sample
    changed = copy.deepcopy(row)
    text = changed[1]["input_ids"] != model.image_token_id
    changed[1]["input_ids"][text] = (changed[1]["input_ids"][text] + 7) % (VOCAB - 3) + 3
    changed[1]["pixel_values"] = changed[1]["pixel_values"] + 1.0

    def logits(rows):
        batch = PackedCollator(1)(rows)
        with torch.no_grad():
            out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                        position_ids=batch["position_ids"], packed=True).logits[0]
        return out

    before, after = logits([row]), logits([changed])
    bounds = torch.tensor([0] + [len(s["input_ids"]) for s in row]).cumsum(0).tolist()
    (a0, a1), (b0, b1), (c0, c1) = zip(bounds[:-1], bounds[1:])
    torch.testing.assert_close(after[a0:a1], before[a0:a1], rtol=0, atol=1e-6)
    torch.testing.assert_close(after[c0:c1], before[c0:c1], rtol=0, atol=1e-6)
    assert not torch.allclose(after[b0:b1], before[b0:b1])  # the change itself is visible
    # without packing isolation (a plain causal row) the sample after the change would see it
    with torch.no_grad():
        batch = PackedCollator(1)([changed])
        leaky = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits[0]
    assert not torch.allclose(leaky[c0:c1], before[c0:c1], atol=1e-4)


def test_positions_restart_labels_cut_at_boundaries_and_keys_listed() -> None:
    model = tiny_model()
    samples = mixed_samples(model)
    rows = packed_rows(samples, 96)
    batch = PackedCollator(1)(rows)
    for r, row in enumerate(rows):
        start = 0
        for sample in row:
            n = len(sample["input_ids"])
            assert batch["position_ids"][r, start : start + n].tolist() == list(range(n))
            assert batch["labels"][r, start] == IGNORE_INDEX  # nothing is learned across the boundary
            assert torch.equal(batch["input_ids"][r, start : start + n], sample["input_ids"])
            start += n
        assert batch["attention_mask"][r].sum() == start and not batch["attention_mask"][r, start:].any()
    assert batch["keys"] == [s["key"] for row in rows for s in row]
    assert torch.equal(batch["pixel_values"], torch.cat([s["pixel_values"] for row in rows for s in row
                                                         if "pixel_values" in s]))
    segments = attention.segment_ids(batch["position_ids"], batch["attention_mask"])
    assert segments.max(1).values.tolist() == [len(r) for r in rows]


def test_best_fit_keeps_whole_items_and_fills_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 300, (500,), generator=gen).tolist()
    rows = best_fit(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert sum(lengths) / (512 * len(rows)) > 0.95  # best fit over a buffer leaves little room
    assert [row[0] for row in rows] == sorted(row[0] for row in rows)
    with pytest.raises(ValueError, match="does not fit"):
        best_fit([600], 512)


def test_a_group_stays_in_one_row_in_order() -> None:
    """A unit of several samples (e.g. a preference pair) shares a row; each member keeps its own positions."""
    model = tiny_model()
    samples = mixed_samples(model)
    units = [(samples[0], samples[1]), samples[2], (samples[3], samples[4]), samples[6]]
    rows = [[units[i] for i in row] for row in best_fit([unit_length(u) for u in units], 96)]
    batch = PackedCollator(1)(rows)
    keys = batch["keys"]
    assert keys.index("s1") == keys.index("s0") + 1 and keys.index("s4") == keys.index("s3") + 1
    assert ((batch["position_ids"] == 0) & batch["attention_mask"].bool()).sum() == 6


# ---------------------------------------------------------------- the packed stream


@pytest.fixture(scope="module")
def shapes(make_shapes) -> Path:
    return make_shapes(num_train=120, num_val=10, num_test=10, samples_per_shard=20)


@pytest.fixture(scope="module")
def processor(shapes: Path):
    from vlm.data.images import ImageTransform
    from vlm.data.processor import Processor
    from vlm.data.tokens import load_tokenizer

    tokenizer = load_tokenizer(str(shapes / "tokenizer"))
    return Processor(tokenizer, ImageTransform(16, (0.5,) * 3, (0.5,) * 3), tokens_per_image=4, max_length=128)


def _train_urls(shapes: Path) -> str:
    return str(shapes / "train.txt")


@pytest.mark.parametrize(("workers", "resampled"), [(0, True), (2, False)])
def test_packed_stream_resumes_with_the_same_rows(shapes, processor, workers: int, resampled: bool) -> None:
    """Resumed mid-chunk (the packing buffer half served), the stream continues with the uninterrupted run's rows."""
    from vlm.data.datamodule import DataModule

    kwargs = dict(format="conversation", batch_size=2, num_workers=workers, shuffle_buffer=10, seed=3,
                  resampled=resampled, packing=True, pack_length=96, pack_buffer=24)
    k, n = 4, 6
    dm = DataModule(processor, _train_urls(shapes), **kwargs)
    stream = iter(dm.train_dataloader())
    for _ in range(k):
        dm.record_batch(next(stream))
    state = dm.state_dict()
    reference = [next(stream) for _ in range(n)]
    assert any(p % ROWS_PER_CHUNK for p in state["positions_by_rank"][0])  # resumed inside a chunk
    assert all(len(b["keys"]) > b["input_ids"].shape[0] for b in reference)  # rows hold several samples
    assert all(b["input_ids"].shape[1] <= 96 for b in reference)

    resumed = DataModule(processor, _train_urls(shapes), **kwargs)
    resumed.load_state_dict(state)
    stream = iter(resumed.train_dataloader())
    again = [next(stream) for _ in range(n)]
    for a, b in zip(reference, again):
        assert a["keys"] == b["keys"] and a["stream"] == b["stream"]
        for key in ("input_ids", "labels", "position_ids", "attention_mask", "pixel_values"):
            assert torch.equal(a[key], b[key]), key

    unpacked = DataModule(processor, _train_urls(shapes), **{**kwargs, "packing": False})
    unpacked.load_state_dict(state)  # a packed cursor is no raw position: that resume is not exact
    unpacked.train_dataloader()
    assert unpacked.progress.salt > 0


def test_packing_pays_on_the_shapes_captions(shapes, processor) -> None:
    """Padded slots of the same stream with and without packing; samples are never split or lost. (Captions: one to
    four objects make them 2-4x apart in length; the shapes world's one-question conversations are all alike.)"""
    from vlm.data.datamodule import DataModule

    kwargs = dict(format="caption", batch_size=4, num_workers=0, shuffle_buffer=10, seed=3, resampled=False)
    def share(dm):
        real = slots = 0
        keys = []
        for batch in dm.train_dataloader():
            real += int(batch["attention_mask"].sum())
            slots += batch["attention_mask"].numel()
            keys += batch["keys"]
        return 1 - real / slots, keys

    padded, padded_keys = share(DataModule(processor, _train_urls(shapes), **kwargs))
    packed, packed_keys = share(DataModule(processor, _train_urls(shapes), packing=True, pack_length=128,
                                           pack_buffer=64, **kwargs))
    assert sorted(packed_keys) == sorted(padded_keys) and len(packed_keys) == 120
    assert packed < padded and packed < 0.1


def test_packing_needs_a_token_processor() -> None:
    from vlm.data.packing import packing_for

    with pytest.raises(ValueError, match="next-token stages"):
        packing_for(object(), None, 16)


# ---------------------------------------------------------------- a packed sft stage, resumed


def _rows(run_dir: Path) -> dict[tuple[int, str], float]:
    import csv

    rows = {}
    with open(run_dir / "logs" / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            rows.update({(int(row["step"]), k): float(v) for k, v in row.items() if v and k != "step"})
    return rows


def test_packed_sft_stage_logs_tokens_and_resumes_exactly(shapes, tmp_path, logs) -> None:
    """`data.packing=true` through the stage runner with gradient accumulation: the accounting is logged and
    printed at the end; resumed from a checkpoint, the weights and the logged curves match the uninterrupted run."""
    import sys

    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
    from resume_run import compose_config

    from vlm.run import run_stage

    run = ["stage=sft", "trainer.max_steps=4", "trainer.accumulate_grad_batches=2", "data.packing=true",
           "data.pack_length=160", "data.pack_buffer=16", "data.batch_size=2", "callbacks.checkpoint.every_n_steps=2",
           "data.prepare.num_train=120", "data.prepare.num_val=10", "data.prepare.num_test=10",
           "data.prepare.samples_per_shard=20"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_stage(compose_config(shapes.parent, [*run, f"run_dir={tmp_path / 'full'}"]))
        run_stage(compose_config(shapes.parent, [*run, f"run_dir={tmp_path / 'resumed'}",
                                                 f"resume={tmp_path / 'full' / 'checkpoints' / 'step-00000002.ckpt'}"]))
    finally:
        torch.set_num_threads(threads)
    assert "samples isolated by a block-diagonal additive 4D mask" in logs.text
    line = next(r.getMessage() for r in logs.records if "[sft] tokens:" in r.getMessage())
    full, resumed = _rows(tmp_path / "full"), _rows(tmp_path / "resumed")
    tokens = sorted((s, v) for (s, k), v in full.items() if k == "train/tokens")
    assert [s for s, _ in tokens] == [0, 1, 2, 3] and all(b > a > 0 for (_, a), (_, b) in zip(tokens, tokens[1:]))
    assert f"{tokens[-1][1]:,.0f} real" in line
    shares = [v for (s, k), v in full.items() if k == "train/padding_share"]
    assert all(0 <= v < 0.2 for v in shares) and any(k == "train/tokens_per_s" for _, k in full)
    for key in [k for k in full if k[0] >= 2 and k[1] in ("train/loss", "train/tokens", "train/padding_share")]:
        assert resumed[key] == pytest.approx(full[key], rel=1e-5), key
    expected, got = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("full", "resumed"))
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_nonfinite_guard_names_every_sample_of_a_packed_batch() -> None:
    import lightning as L

    from vlm.stages.base import NonFiniteLossError
    from vlm.stages.generative import GenerativeStage

    model = tiny_model()
    samples = mixed_samples(model)
    samples[5]["pixel_values"][0, 0, 0, 0] = float("nan")
    batch = PackedCollator(1)(packed_rows(samples, 96))
    stage = GenerativeStage(model, ["projector"], {"lr": 1e-3, "warmup_steps": 0})
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(NonFiniteLossError) as error:
        trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    assert all(s["key"] in str(error.value) for s in samples)


@pytest.mark.parametrize("k", [1, 2, 3])  # resumed before, at and after the switch to the larger image size
def test_packed_stream_follows_a_resolution_schedule_and_resumes_across_it(shapes, processor, k: int,
                                                                             logs) -> None:
    from vlm.data.datamodule import DataModule
    from vlm.data.tokens import IMAGE_TOKEN

    kwargs = dict(format="conversation", batch_size=2, num_workers=0, shuffle_buffer=10, seed=4, packing=True,
                  pack_length=200, pack_buffer=20, resolution_schedule={0: 16, 2: 32})

    def module():
        dm = DataModule(processor, _train_urls(shapes), **kwargs)
        dm.processors.tokens[32] = 16  # tokens per tile at 32 px (the model would say; none is needed here)
        return dm

    image = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    dm = module()
    stream = iter(dm.train_dataloader())
    reference = [next(stream) for _ in range(6)]
    for index, batch in enumerate(reference):
        size = 16 if index < 2 else 32
        assert batch["stream"]["image_size"] == size and batch["pixel_values"].shape[-1] == size
        tiles = batch["pixel_values"].shape[0]
        assert int((batch["input_ids"] == image).sum()) == tiles * (4 if size == 16 else 16)
    assert "image size 16 -> 32" in logs.text  # the rest of the 16 px chunk was dropped at the switch

    first = module()
    stream = iter(first.train_dataloader())
    for _ in range(k):
        first.record_batch(next(stream))
    resumed = module()
    resumed.load_state_dict(first.state_dict())
    stream = iter(resumed.train_dataloader())
    for expected in reference[k:]:
        got = next(stream)
        assert got["keys"] == expected["keys"] and torch.equal(got["input_ids"], expected["input_ids"])
        assert torch.equal(got["pixel_values"], expected["pixel_values"])
