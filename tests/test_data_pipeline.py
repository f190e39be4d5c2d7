"""Webdataset pipeline and DataModule: shard lists, counted skips, one-pass coverage, batches."""
from __future__ import annotations

import io
import json
from pathlib import Path

import jinja2
import pytest
import torch
import webdataset as wds
from PIL import Image

from vlm.data.datamodule import DataModule
from vlm.data.formats import SkipSample, conversation_record, to_record
from vlm.data.images import ImageTransform
from vlm.data.processor import IGNORE_INDEX, Processor
from vlm.data.shards import expand_shards
from vlm.data.synthetic.shapes import ensure_shapes
from vlm.data.tar import iterate_samples
from vlm.data.tokens import load_tokenizer

T = 2


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return ensure_shapes(tmp_path_factory.mktemp("pipe") / "shapes", num_train=90, num_val=20, num_test=10,
                         samples_per_shard=30)


@pytest.fixture(scope="module")
def processor(shapes: Path) -> Processor:
    tokenizer = load_tokenizer(str(shapes / "tokenizer"))
    return Processor(tokenizer, ImageTransform(16, (0.5,) * 3, (0.5,) * 3), tokens_per_image=T, max_length=128)


def _png(color=(255, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def broken_shard(tmp_path: Path) -> Path:
    """Four samples: two good, one with a truncated PNG, one without any caption."""
    path = tmp_path / "mixed-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "good1", "png": _png(), "txt": b"a red square."})
        sink.write({"__key__": "corrupt", "png": _png()[:40], "txt": b"a broken image."})
        sink.write({"__key__": "nocaption", "png": _png(), "json": json.dumps({"objects": []}).encode()})
        sink.write({"__key__": "good2", "png": _png((0, 0, 255)), "txt": b"a blue square."})
    return path


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_samples_are_skipped_and_counted(broken_shard: Path, processor: Processor, workers: int) -> None:
    dm = DataModule(processor, str(broken_shard), format="caption", batch_size=8, num_workers=workers,
                    resampled=False, shuffle_buffer=0)
    batches = list(dm.train_dataloader())
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == ["good1", "good2"]
    # counts made inside a DataLoader worker process are visible here
    assert dm.skipped() == {"corrupt_image": 1, "missing_caption": 1}
    assert dm.skipped("train") == dm.skipped() and dm.skipped("val") == {}


def test_missing_pattern_fails_at_construction(tmp_path: Path, processor: Processor) -> None:
    pattern = str(tmp_path / "nothing-{000000..000003}.tar")
    with pytest.raises(FileNotFoundError, match=r"nothing-\{000000\.\.000003\}\.tar"):
        DataModule(processor, pattern)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        expand_shards(str(tmp_path / "nope.txt"))


def test_shard_specs(shapes: Path) -> None:
    names = [str(shapes / f"train-00000{i}.tar") for i in range(3)]
    assert expand_shards(str(shapes / "train-{000000..000002}.tar")) == names
    assert expand_shards(str(shapes / "train.txt")) == names  # relative entries resolved against the list file
    assert expand_shards([names[0], str(shapes / "train-00000[12].tar")]) == names
    partial = str(shapes / "train-{000000..000005}.tar")
    with pytest.raises(FileNotFoundError, match="train-000003.tar"):  # a named file that is missing: an error
        expand_shards(partial)
    assert expand_shards(partial, allow_missing=True) == names  # unless asked to keep what exists
    assert expand_shards(f"pipe:cat {names[0]}") == [f"pipe:cat {names[0]}"]
    first = next(iterate_samples(f"pipe:cat {names[0]}"))
    assert first["__key__"] == "train-000000" and isinstance(first["png"], Image.Image)
    assert isinstance(first["json"], dict) and first["txt"] == first["json"]["caption"]


def test_conversation_formats() -> None:
    llava = {"__key__": "l", "jpg": Image.new("RGB", (4, 4)),
             "json": {"conversations": [{"from": "human", "value": "what is it?"}, {"from": "gpt", "value": "red"}]}}
    record = conversation_record(llava)
    assert record.messages[0] == {"role": "user", "content": "<image>\nwhat is it?"}  # tag added for the image
    assert record.messages[1]["role"] == "assistant" and len(record.images) == 1
    text_only = {"__key__": "t", "json": {"conversations": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "hello"}]}}
    assert to_record(text_only, "conversation").images == []
    two_tags = {"__key__": "x", "png": Image.new("RGB", (4, 4)), "json": {"conversations": [
        {"role": "user", "content": "<image><image>?"}, {"role": "assistant", "content": "a"}]}}
    with pytest.raises(SkipSample) as info:
        to_record(two_tags, "conversation")
    assert info.value.reason == "too_many_image_tags"
    multi = {"__key__": "m", "a.png": Image.new("RGB", (4, 4)), "b.png": Image.new("RGB", (4, 4), "white"),
             "json": {"images": ["a.png", "b.png"], "conversations": [
                 {"role": "user", "content": "<image> vs <image>"}, {"role": "assistant", "content": "differ"}]}}
    assert [im.getpixel((0, 0)) for im in to_record(multi, "conversation").images] == [(0, 0, 0), (255, 255, 255)]
    no_reply = {"__key__": "n", "json": {"conversations": [{"role": "user", "content": "hi"}]}}
    with pytest.raises(SkipSample, match="no_assistant_turn"):
        to_record(no_reply, "conversation")
    prompts = ["P1", "P2", "P3"]
    caption = {"__key__": "c7", "png": Image.new("RGB", (4, 4)), "txt": "a cat."}
    first = to_record(caption, "caption", prompts).messages
    assert first == to_record(caption, "caption", prompts).messages  # deterministic per key
    assert first[0]["content"].removeprefix("<image>\n") in prompts and first[1]["content"] == "a cat."


def test_datamodule_batches(shapes: Path, processor: Processor) -> None:
    dm = DataModule(processor, str(shapes / "train.txt"), val=str(shapes / "val.txt"), format="conversation",
                    batch_size=4, num_workers=1, shuffle_buffer=20, val_batches=2, seed=0, prepare={"ignored": 1})
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "keys", "stream"}
    assert batch["stream"] == {"worker": 0, "epoch": 0, "position": batch["stream"]["position"], "index": 0,
                               "image_size": 16}
    b, length = batch["input_ids"].shape
    assert b == 4 and batch["labels"].shape == batch["attention_mask"].shape == (4, length)
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].dtype == torch.long
    assert ((batch["labels"] != IGNORE_INDEX).sum(1) > 0).all()
    image_id = processor.image_token_id
    assert ((batch["input_ids"] == image_id).sum(1) == T).all()
    val = list(dm.val_dataloader())
    assert len(val) == 2 and val[0]["keys"][0] == "val-000000"  # capped, in shard order
    assert dm.skipped() == {}


def test_resampled_stream_is_seeded(shapes: Path, processor: Processor) -> None:
    def first_keys(seed: int) -> list[str]:
        dm = DataModule(processor, str(shapes / "train.txt"), format="text", batch_size=8, num_workers=0,
                        shuffle_buffer=10, seed=seed)
        loader = iter(dm.train_dataloader())
        return [k for _ in range(3) for k in next(loader)["keys"]]

    assert first_keys(0) == first_keys(0)
    assert first_keys(0) != first_keys(1)


def test_epoch_mode_covers_every_sample_once_across_workers(shapes: Path, processor: Processor) -> None:
    dm = DataModule(processor, str(shapes / "train.txt"), format="text", batch_size=16, num_workers=2,
                    resampled=False, shuffle_buffer=10, shardshuffle=10)
    loader = dm.train_dataloader()
    epochs = [[k for b in loader for k in b["keys"]] for _ in range(2)]
    for keys in epochs:
        assert sorted(keys) == [f"train-{i:06d}" for i in range(90)]
    assert epochs[0] != epochs[1]  # reshuffled between epochs


def test_a_bug_in_processing_is_raised_not_skipped() -> None:
    """Bad data is skipped and counted; a programming error (here a TypeError) must surface."""
    from vlm.data.skips import SkipCounter

    counter = SkipCounter()
    handler = counter.handler("processing_error")
    assert handler(OSError("broken PNG")) is True
    assert handler(jinja2.TemplateError("Conversation roles must alternate user/assistant")) is True
    with pytest.raises(TypeError, match="bug"):
        handler(TypeError("a bug"))
    assert counter.counts() == {"processing_error": 2}
