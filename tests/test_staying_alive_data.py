"""Staying alive with bad data (issues 16 and 17): unreadable shards and wrongly typed samples are counted, never
fatal; a stream that yields nothing stops with its counted reasons; the formats follow the data, so LLaVA's
stage-1 conversations train `align`; converters skip rows of any shape and list only complete shards."""
from __future__ import annotations

import gzip
import io
import json
import re
import sys
import time
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from vlm.data.convert.__main__ import main as convert
from vlm.data.datamodule import DataModule
from vlm.data.formats import decode_sample, to_record
from vlm.data.images import ImageTransform
from vlm.data.processor import Processor
from vlm.data.shards import expand_shards
from vlm.data.skips import NoUsableSamples, SkipCounter
from vlm.data.tar import iterate_samples
from vlm.data.tokens import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))


@pytest.fixture(scope="module")
def processor(shapes: Path) -> Processor:
    tokenizer = load_tokenizer(str(shapes / "tokenizer"))
    return Processor(tokenizer, ImageTransform(16, (0.5,) * 3, (0.5,) * 3), tokens_per_image=2, max_length=128)


def _png(value: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value % 256, 40, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def _conversation(i: int, **extra) -> dict:
    turns = [{"from": "human", "value": f"<image>\nwhat is {i}?"}, {"from": "gpt", "value": f"it is {i}."}]
    return {"conversations": turns, **extra}


def _good_shard(path: Path, n: int, tag: str, bad_images_field: bool = False) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            meta = _conversation(i, images=5) if bad_images_field and i == 1 else _conversation(i)
            sink.write({"__key__": f"{tag}{i:03d}", "png": _png(i), "json": json.dumps(meta).encode()})
    return path


@pytest.fixture()
def bad_shards(tmp_path: Path) -> Path:
    """A shard list: a good shard holding one `"images": 5` sample, a zero-byte shard, a file that is not a tar, a
    tar cut inside a member's data, and a cut-off gzip."""
    good = _good_shard(tmp_path / "good.tar", 12, "g", bad_images_field=True)
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "notatar.tar").write_bytes(b"this is not a tar file\n" * 40)
    whole = _good_shard(tmp_path / "whole.tar", 6, "c").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[: len(whole) // 2 + 100])
    (tmp_path / "whole.tar").unlink()
    gz = gzip.compress(_good_shard(tmp_path / "z.tar", 6, "z").read_bytes())
    (tmp_path / "cut.tar.gz").write_bytes(gz[: len(gz) // 2])
    (tmp_path / "z.tar").unlink()
    listing = tmp_path / "train.txt"
    listing.write_text("\n".join([good.name, "empty.tar", "notatar.tar", "cut.tar", "cut.tar.gz"]) + "\n")
    return listing


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_shards_and_wrongly_typed_fields_are_counted_never_fatal(bad_shards: Path, processor: Processor,
                                                                     workers: int, vlm_warnings) -> None:
    dm = DataModule(processor, str(bad_shards), format="conversation", batch_size=4, num_workers=workers,
                    resampled=True, shuffle_buffer=0, val=str(bad_shards))
    loader = iter(dm.train_dataloader())
    batches = [next(loader) for _ in range(15)]  # an infinite stream that goes on drawing every shard
    skipped = dm.skipped("train")
    assert skipped.get("read_error", 0) >= 4 and skipped.get("bad_json", 0) >= 1, skipped
    assert set(skipped) <= {"read_error", "bad_json"}
    keys = _keys(batches)
    assert "g001" not in keys and {"g000", "g002"} <= set(keys)
    assert all(k[0] in "gcz" for k in keys)
    if workers == 0:  # the first warnings name the shard
        warned = [r.getMessage() for r in vlm_warnings.records if "read_error" in r.getMessage()]
        assert warned and all(re.search(r"shard \S+/(empty|notatar|cut)\.tar", m) for m in warned), warned
    # validation reads the same list in one pass, and evaluation too
    assert {"g000", "g011"} <= set(_keys(dm.val_dataloader()))
    counter = SkipCounter()
    evaluated = [s["__key__"] for s in iterate_samples(str(bad_shards), counter=counter)]
    assert "g001" in evaluated and counter.counts()["read_error"] == 4


def test_a_sample_cut_short_is_dropped_not_used_half_complete(tmp_path: Path) -> None:
    whole = _good_shard(tmp_path / "whole.tar", 4, "c").read_bytes()
    png = whole.index(_png(2))  # the data of c002's second file (its png, after its json)
    (tmp_path / "cut.tar").write_bytes(whole[: png + 40])  # cut inside it
    counter = SkipCounter()
    samples = list(iterate_samples(str(tmp_path / "cut.tar"), counter=counter))
    assert [s["__key__"] for s in samples] == ["c000", "c001"]  # c002 has its json only: dropped
    assert counter.counts() == {"read_error": 1}


def test_allow_missing_shards_works_for_list_files(tmp_path: Path, processor: Processor) -> None:
    _good_shard(tmp_path / "a.tar", 3, "a")
    (tmp_path / "train.txt").write_text("a.tar\nmissing-1.tar\nmissing-2.tar\n")
    with pytest.raises(FileNotFoundError, match="missing-1.tar"):
        expand_shards(str(tmp_path / "train.txt"))
    assert expand_shards(str(tmp_path / "train.txt"), allow_missing=True) == [str(tmp_path / "a.tar")]
    dm = DataModule(processor, str(tmp_path / "train.txt"), allow_missing_shards=True, resampled=False)
    assert dm.train_urls == [str(tmp_path / "a.tar")]


# ---- issue 16.2: a stream that yields nothing stops ----------------------------------------------------------------
def _corrupt_images(path: Path, n: int) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            sink.write({"__key__": f"x{i:04d}", "png": _png(i)[:30], "txt": f"caption {i}".encode()})
    return path


@pytest.mark.parametrize("workers", [0, 1])
def test_an_all_skipped_stream_stops_with_the_counted_reasons(tmp_path: Path, processor: Processor,
                                                              workers: int) -> None:
    shard = _corrupt_images(tmp_path / "x.tar", 30)
    dm = DataModule(processor, str(shard), format="caption", batch_size=4, num_workers=workers, resampled=True,
                    shuffle_buffer=0, max_consecutive_skips=200, val=str(shard))
    start = time.monotonic()
    with pytest.raises(NoUsableSamples, match=r"training data: all 200 samples skipped: corrupt_image 200 — the "
                                              r"images do not decode"):
        next(iter(dm.train_dataloader()))  # resampled: it used to spin here forever
    assert time.monotonic() - start < 30
    with pytest.raises(NoUsableSamples, match=r"validation stream yielded no batch; skipped samples: "
                                              r"corrupt_image 30"):
        list(dm.val_dataloader())
    with pytest.raises(NoUsableSamples, match=r"evaluation data: all 20 samples skipped: read_error 20"):
        list(iterate_samples([str(p) for p in _not_tars(tmp_path, 20)], max_consecutive_skips=20))


def _not_tars(root: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        paths.append(root / f"junk-{i}.tar")
        paths[-1].write_bytes(b"junk")
    return paths


def test_a_format_that_cannot_be_used_is_an_error_at_start_up(tmp_path: Path, processor: Processor) -> None:
    path = tmp_path / "images-only.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(20):
            sink.write({"__key__": f"i{i:03d}", "png": _png(i), "json": json.dumps({"url": "x"}).encode()})
    with pytest.raises(ValueError, match=r"data source 'train': none of its first 16 samples can be read as "
                                         r"'caption': missing_caption 16 — the samples have no .txt caption, no "
                                         r"json `caption` and no json `conversations`: set data.caption_field"):
        DataModule(processor, str(path), format="caption")
    with pytest.raises(ValueError, match="can be read as 'text': missing_text 16"):
        DataModule(processor, str(path), format="text")


# ---- issue 16.1: formats follow the data ---------------------------------------------------------------------------
LLAVA_558K = [  # blip_laion_cc_sbu_558k.json's layout: one-turn conversations, the tag after the instruction
    {"id": f"00453{i:04d}", "image": f"00453/00453{i:04d}.jpg", "conversations": [
        {"from": "human", "value": ["Render a clear and concise summary of the photo.\n<image>",
                                    "<image>\nWrite a terse but informative summary of the picture."][i % 2]},
        {"from": "gpt", "value": f"a {['red', 'blue', 'green'][i % 3]} square on a white table {i}"}]}
    for i in range(12)
]


def test_align_trains_on_converted_llava_stage1_data(tmp_path: Path, shapes: Path) -> None:
    from resume_run import compose_config

    from vlm.run import run_stage

    images = tmp_path / "images"
    for entry in LLAVA_558K:
        (images / entry["image"]).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (int(entry["id"][-2:]) * 20, 90, 30)).save(images / entry["image"])
    (tmp_path / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(LLAVA_558K))
    out = tmp_path / "shards"
    assert convert(["llava", f"json={tmp_path / 'blip_laion_cc_sbu_558k.json'}", f"images={images}", f"out={out}",
                    "samples_per_shard=5", "quiet=true"]) == 0

    sample = next(iter(iterate_samples(str(out / "train.txt"))))
    record = to_record(decode_sample(sample), "caption")  # align's format: read as the conversation it is
    assert record.messages[-1]["content"].startswith("a red square") and len(record.images) == 1

    cfg = compose_config(shapes.parent, ["stage=align", f"data.train={out / 'train.txt'}", "data.val=null",
                                         "data.test=null", "data.prepare=null", "trainer.max_steps=3",
                                         f"run_dir={tmp_path / 'run'}"])
    model_dir = run_stage(cfg)
    assert (model_dir / "model.safetensors").is_file()
    rows = (tmp_path / "run" / "logs" / "metrics.csv").read_text()
    assert "train/loss" in rows and "data/skipped/missing_caption" not in rows


# ---- converters ----------------------------------------------------------------------------------------------------
def test_converters_skip_rows_of_any_shape_and_images_outside_their_folder(tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8), "red").save(images / "in.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "outside.png")
    turns = _conversation(0)["conversations"]
    entries = [
        {"id": "ok", "image": "in.png", "conversations": turns},
        {"id": "number", "image": 5, "conversations": turns},
        {"id": "dict", "image": {"a": 1}, "conversations": turns},
        ["not", "an", "entry"],
        {"id": "turns", "image": "in.png", "conversations": "hello"},
        {"id": "up", "image": "../outside.png", "conversations": turns},
        {"id": "abs", "image": str(tmp_path / "outside.png"), "conversations": turns},
    ]
    (tmp_path / "data.json").write_text(json.dumps(entries))
    args = ["llava", f"json={tmp_path / 'data.json'}", f"images={images}", "quiet=true"]
    convert([*args, f"out={tmp_path / 'a'}"])
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("llava: written 1, skipped 6 (bad_entry 3, missing_conversation 1, "
                              "outside_images 2)"), summary
    assert (tmp_path / "a" / "train.txt").read_text().split() == ["train-000000.tar"]
    stats = json.loads((tmp_path / "a" / "train.stats.json").read_text())
    assert stats["written"] == 1 and "allow_outside=true" in stats["first_skipped"]["outside_images"]
    convert([*args, f"out={tmp_path / 'b'}", "allow_outside=true"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("llava: written 3, skipped 4")

    (tmp_path / "rows.jsonl").write_text('{"file": "in.png", "caption": "red"}\n[1, 2]\n7\n'
                                         '{"file": "../outside.png", "caption": "blue"}\n')
    convert(["images", f"images={images}", f"captions={tmp_path / 'rows.jsonl'}", "quiet=true",
             f"out={tmp_path / 'c'}"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        "images: written 1, skipped 3 (bad_row 2, outside_images 1)")


def test_an_aborted_conversion_lists_no_shard(tmp_path: Path, monkeypatch) -> None:
    import vlm.data.convert.llava as llava

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8), "red").save(images / "in.png")
    entries = [{"id": str(i), "image": "in.png", "conversations": _conversation(i)["conversations"]}
               for i in range(7)]
    (tmp_path / "data.json").write_text(json.dumps(entries))
    real, calls = llava.image_bytes, []

    def failing(path):
        calls.append(path)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(llava, "image_bytes", failing)
    with pytest.raises(KeyboardInterrupt):
        convert(["llava", f"json={tmp_path / 'data.json'}", f"images={images}", "quiet=true",
                 f"out={tmp_path / 'out'}", "samples_per_shard=3"])
    out = tmp_path / "out"
    assert not (out / "train.txt").exists() and not (out / "train.stats.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar"]  # the complete one stays, unlisted
