"""Converters on small folders made here (a corrupt image, a caption-less row, text-only and two-image LLaVA
samples), read back through the pipeline; img2dataset shards read as they are."""
from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from vlm.data.convert.__main__ import main
from vlm.data.datamodule import DataModule
from vlm.data.formats import to_record
from vlm.data.images import ImageTransform
from vlm.data.processor import Processor
from vlm.data.skips import SkipCounter
from vlm.data.synthetic.shapes import ensure_shapes
from vlm.data.tar import iterate_samples
from vlm.data.tokens import IMAGE_TOKEN, load_tokenizer

COLORS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 160, 0)}


@pytest.fixture(scope="module")
def processor(tmp_path_factory) -> Processor:
    shapes = ensure_shapes(tmp_path_factory.mktemp("conv") / "shapes", num_train=10, num_val=2, num_test=2,
                           samples_per_shard=10)
    tokenizer = load_tokenizer(str(shapes / "tokenizer"))
    return Processor(tokenizer, ImageTransform(16, (0.5,) * 3, (0.5,) * 3), tokens_per_image=2, max_length=128)


def _image(path: Path, color: str, size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLORS[color]).save(path)
    return path


def _corrupt(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), (1, 2, 3)).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[:60])  # a truncated JPEG
    return path


def _members(out: Path) -> list[str]:
    names = []
    for shard in (out / "train.txt").read_text().split():
        with tarfile.open(out / shard) as tar:
            names += tar.getnames()
    return names


@pytest.mark.parametrize("table", ["csv", "jsonl"])
def test_images_converter(tmp_path: Path, processor: Processor, capsys, table: str) -> None:
    images = tmp_path / "images"
    _image(images / "a.png", "red")
    _image(images / "sub" / "b.jpg", "blue")
    _corrupt(images / "c.jpg")
    _image(images / "d.png", "green")
    rows = [("a.png", "a red block."), ("sub/b.jpg", "a blue block."), ("c.jpg", "broken."), ("d.png", ""),
            ("missing.png", "no such file."), ("notes.txt", "not an image.")]
    if table == "csv":
        captions = tmp_path / "captions.csv"
        with captions.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file_name", "caption", "source"])
            writer.writerows([(n, c, "test") for n, c in rows])
    else:
        captions = tmp_path / "captions.jsonl"
        captions.write_text("".join(json.dumps({"image": n, "text": c}) + "\n" for n, c in rows) + "{oops\n")
    out = tmp_path / "shards"
    assert main(["images", f"images={images}", f"captions={captions}", f"out={out}", "samples_per_shard=1"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    bad_row = "bad_row 1, " if table == "jsonl" else ""  # the JSONL's last line is not JSON
    expected = (f"images: written 2, skipped {4 + bool(bad_row)} ({bad_row}corrupt_image 1, missing_caption 1, "
                "missing_image 1, unsupported_image 1)")
    assert summary.startswith(expected), summary
    assert sorted(_members(out)) == sorted(f"{k}.{e}" for k, x in (("000000000", "png"), ("000000001", "jpg"))
                                           for e in (x, "txt", "json"))  # img2dataset layout, keys = row numbers
    stats = json.loads((out / "train.stats.json").read_text())
    assert stats["written"] == 2 and stats["skipped"]["corrupt_image"] == 1

    dm = DataModule(processor, str(out / "train.txt"), format="caption", batch_size=8, num_workers=0,
                    resampled=False, shuffle_buffer=0, shardshuffle=False)
    (batch,) = list(dm.train_dataloader())
    assert batch["keys"] == ["000000000", "000000001"] and dm.skipped() == {}
    replies = [processor.tokenizer.decode([t for t in row if t >= 0]) for row in batch["labels"].tolist()]
    assert replies[0].startswith("a red block.") and replies[1].startswith("a blue block.")
    assert batch["pixel_values"][0, 0].mean() > batch["pixel_values"][1, 0].mean()  # red first, blue second
    samples = list(iterate_samples(str(out / "train.txt")))
    assert samples[1]["json"]["file_name"] == "sub/b.jpg"


LLAVA = [
    {"id": "single", "image": "coco/1.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."}]},
    {"id": "text", "conversations": [
        {"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
    {"id": "two", "image": ["coco/1.png", "coco/2.png"], "conversations": [
        {"from": "human", "value": "Left <image> right <image>. Same?"}, {"from": "gpt", "value": "No."}]},
    {"id": "after", "image": "coco/2.png", "conversations": [
        {"from": "human", "value": "Describe briefly.\n<image>"}, {"from": "gpt", "value": "Blue."},
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
    {"id": "gone", "image": "coco/404.png", "conversations": [
        {"from": "human", "value": "<image>\n?"}, {"from": "gpt", "value": "."}]},
    {"id": "broken", "image": "coco/bad.jpg", "conversations": [
        {"from": "human", "value": "<image>\n?"}, {"from": "gpt", "value": "."}]},
    {"id": "mute", "image": "coco/1.png", "conversations": [{"from": "human", "value": "<image>\nHello?"}]},
    {"id": "greedy", "image": "coco/1.png", "conversations": [
        {"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]},
]


def test_llava_converter(tmp_path: Path, processor: Processor, capsys) -> None:
    images = tmp_path / "images"
    _image(images / "coco" / "1.png", "red")
    _image(images / "coco" / "2.png", "blue")
    _corrupt(images / "coco" / "bad.jpg")
    data = tmp_path / "llava.json"
    data.write_text(json.dumps(LLAVA))
    out = tmp_path / "shards"
    assert main(["llava", f"json={data}", f"images={images}", f"out={out}", "samples_per_shard=3",
                 "quiet=true"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("llava: written 4, skipped 4 (corrupt_image 1, missing_image 1, no_assistant_turn 1, "
                              "too_many_image_tags 1)"), summary
    assert "1 text-only, 1 multi-image" in summary
    assert (out / "train.txt").read_text().split() == ["train-000000.tar", "train-000001.tar"]

    counter = SkipCounter()
    records = {s["json"]["id"]: to_record(s, "conversation")
               for s in iterate_samples(str(out / "train.txt"), counter=counter)}
    assert counter.counts() == {} and list(records) == ["single", "text", "two", "after"]
    assert records["text"].images == [] and records["text"].messages[0]["content"] == "Say hi."
    assert [im.getpixel((0, 0)) for im in records["two"].images] == [COLORS["red"], COLORS["blue"]]
    assert records["two"].messages[0]["content"] == "Left <image> right <image>. Same?"
    assert records["after"].messages[0]["content"] == "Describe briefly.\n<image>"  # the tag stays after the text
    assert [m["role"] for m in records["after"].messages] == ["user", "assistant", "user", "assistant"]

    # through the processor: the image's tokens stand where its tag stood
    after = processor(records["after"])
    text = processor.tokenizer.decode(after["input_ids"].tolist())
    assert text.index("Describe briefly.") < text.index(IMAGE_TOKEN) < text.index("Blue.")
    dm = DataModule(processor, str(out / "train.txt"), format="conversation", batch_size=4, num_workers=0,
                    resampled=False, shuffle_buffer=0, shardshuffle=False)
    (batch,) = list(dm.train_dataloader())
    image_tokens = (batch["input_ids"] == processor.image_token_id).sum(1).tolist()
    assert image_tokens == [2, 0, 4, 2] and batch["pixel_values"].shape[0] == 4


def test_synthetic_converter(tmp_path: Path, capsys) -> None:
    args = ["synthetic", f"root={tmp_path / 's'}", "num_train=12", "num_val=4", "num_test=4", "samples_per_shard=5",
            "image_size=16", "quiet=true"]
    main(args)
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert first.startswith("synthetic: written 20, skipped 0") and "train 12, val 4, test 4" in first
    assert (tmp_path / "s" / "train.txt").read_text().split() == [f"train-00000{i}.tar" for i in range(3)]
    main(args)
    assert capsys.readouterr().out.strip().endswith("[already generated]")


def test_img2dataset_shards_read_as_they_are(tmp_path: Path, processor: Processor) -> None:
    """img2dataset's layout: `{key}.jpg`, `{key}.txt`, `{key}.json` (url, status, caption, sizes ...)."""
    path = tmp_path / "00000.tar"

    def jpg(color: str) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (20, 14), COLORS[color]).save(buffer, format="JPEG")
        return buffer.getvalue()

    def meta(key: str, caption: str | None) -> bytes:
        return json.dumps({"url": f"http://x/{key}.jpg", "key": key, "status": "success", "error_message": None,
                           "width": 20, "height": 14, "original_width": 40, "original_height": 28,
                           "caption": caption, "exif": "{}", "sha256": "0" * 64}).encode()

    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "000000000", "jpg": jpg("red"), "txt": b"red thing", "json": meta("000000000", "x")})
        sink.write({"__key__": "000000001", "jpg": jpg("blue"), "json": meta("000000001", "blue thing")})
        sink.write({"__key__": "000000002", "jpg": jpg("green"), "json": meta("000000002", None)})
    dm = DataModule(processor, str(path), format="caption", batch_size=4, num_workers=0, resampled=False,
                    shuffle_buffer=0)
    (batch,) = list(dm.train_dataloader())
    replies = [processor.tokenizer.decode([t for t in row if t >= 0]) for row in batch["labels"].tolist()]
    assert batch["keys"] == ["000000000", "000000001"]
    assert replies[0].startswith("red thing") and replies[1].startswith("blue thing")  # txt first, else json
    assert dm.skipped() == {"missing_caption": 1}
    text = DataModule(processor, str(path), format="text", batch_size=4, num_workers=0, resampled=False,
                      shuffle_buffer=0, caption_field="url")  # another json field as the text
    (batch,) = list(text.train_dataloader())
    decoded = [processor.tokenizer.decode(row) for row in batch["input_ids"].tolist()]
    assert "pixel_values" not in batch and "http" in decoded[2]
