"""The training stream: exact resume (with skipped samples), node x worker splitting, mixtures, virtual epochs, and
the DataModule's checkpoint state and skip logging inside a real Lightning fit."""
from __future__ import annotations

import io
import json
import logging
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
import webdataset as wds
from lightning.pytorch.loggers import Logger
from PIL import Image

from vlm.data.datamodule import DataModule
from vlm.data.images import ImageTransform
from vlm.data.processor import Processor
from vlm.data.synthetic.shapes import ensure_shapes
from vlm.data.tokens import load_tokenizer


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return ensure_shapes(tmp_path_factory.mktemp("stream") / "shapes", num_train=80, num_val=10, num_test=10,
                         samples_per_shard=10)


@pytest.fixture(scope="module")
def processor(shapes: Path) -> Processor:
    tokenizer = load_tokenizer(str(shapes / "tokenizer"))
    return Processor(tokenizer, ImageTransform(16, (0.5,) * 3, (0.5,) * 3), tokens_per_image=2, max_length=128)


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 37 % 256, seed * 91 % 256, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def dirty(tmp_path_factory) -> list[str]:
    """6 caption shards of 8 samples; in each, sample 2 has a truncated PNG and sample 5 no caption."""
    root = tmp_path_factory.mktemp("dirty")
    urls = []
    for shard in range(6):
        path = root / f"dirty-{shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for j in range(8):
                key = f"s{shard}-{j}"
                png = _png(shard * 8 + j)
                sample = {"__key__": key, "png": png[:30] if j == 2 else png}
                if j != 5:
                    sample["txt"] = f"caption {shard} {j}".encode()
                sink.write(sample)
        urls.append(str(path))
    return urls


def _text_shards(root: Path, prefix: str, shards: int, per_shard: int) -> list[str]:
    urls = []
    for shard in range(shards):
        path = root / f"{prefix}-{shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for j in range(per_shard):
                sink.write({"__key__": f"{prefix}-{shard}-{j}", "txt": f"{prefix} text {j}".encode()})
        urls.append(str(path))
    return urls


def _same(a: dict, b: dict) -> bool:
    return (a["keys"] == b["keys"] and torch.equal(a["input_ids"], b["input_ids"])
            and torch.equal(a["pixel_values"], b["pixel_values"]) and a["stream"] == b["stream"])


@pytest.mark.parametrize(("workers", "resampled"), [(0, True), (2, True), (2, False)])
def test_resume_is_exact(dirty: list[str], processor: Processor, workers: int, resampled: bool) -> None:
    """Batches k..k+n after a restore equal the uninterrupted run's, though bad samples shift raw positions."""
    kwargs = dict(format="caption", batch_size=3, num_workers=workers, shuffle_buffer=10, resampled=resampled,
                  shardshuffle=True, seed=5)
    k, n = 3, 5  # k is not a multiple of the worker count: the resumed round robin starts at worker 1
    dm = DataModule(processor, dirty, **kwargs)
    stream = iter(dm.train_dataloader())
    for _ in range(k):
        dm.record_batch(next(stream))
    state = dm.state_dict()
    reference = [next(stream) for _ in range(n)]
    assert dm.skipped()  # the positions had to step over skipped samples

    resumed = DataModule(processor, dirty, **kwargs)
    resumed.load_state_dict(state)
    stream = iter(resumed.train_dataloader())
    again = [next(stream) for _ in range(n)]
    assert [b["stream"]["index"] for b in again] == list(range(k, k + n))
    assert all(_same(a, b) for a, b in zip(reference, again))

    fresh = next(iter(DataModule(processor, dirty, **kwargs).train_dataloader()))
    assert fresh["keys"] != again[0]["keys"]  # not simply the start of the stream


def test_changed_worker_count_resumes_on_a_new_stream(dirty, processor, caplog) -> None:
    kwargs = dict(format="caption", batch_size=3, shuffle_buffer=10, seed=5)
    dm = DataModule(processor, dirty, num_workers=0, **kwargs)
    stream = iter(dm.train_dataloader())
    for _ in range(4):
        dm.record_batch(next(stream))
    seen = {k for b in [next(stream) for _ in range(3)] for k in b["keys"]}
    resumed = DataModule(processor, dirty, num_workers=2, **kwargs)
    resumed.load_state_dict(dm.state_dict())
    with caplog.at_level(logging.WARNING):
        batch = next(iter(resumed.train_dataloader()))
    assert "not exactly" in caplog.text and "num_workers" in caplog.text
    assert batch["stream"]["index"] == 4  # the batch count (and so a resolution schedule) still continues
    first = next(iter(DataModule(processor, dirty, num_workers=2, **kwargs).train_dataloader()))
    assert batch["keys"] != first["keys"] and set(batch["keys"]) != seen


def test_two_ranks_two_workers_read_disjoint_shards(shapes, processor, monkeypatch) -> None:
    """Epoch mode, 2 ranks x 2 workers: each (rank, worker) reads its own shards; together every sample once."""
    shards_of: dict[tuple[int, int], set[int]] = {}
    keys: list[str] = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = DataModule(processor, str(shapes / "train.txt"), format="text", batch_size=4, num_workers=2,
                        resampled=False, shardshuffle=True, shuffle_buffer=5, seed=1)
        for batch in dm.train_dataloader():
            reader = (rank, batch["stream"]["worker"])
            keys += batch["keys"]
            shards_of.setdefault(reader, set()).update(int(k.split("-")[1]) // 10 for k in batch["keys"])
    assert sorted(shards_of) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    readers = list(shards_of.values())
    assert all(len(s) == 2 for s in readers)  # 8 shards / 4 readers
    assert all(not (a & b) for i, a in enumerate(readers) for b in readers[i + 1:])
    assert sorted(keys) == [f"train-{i:06d}" for i in range(80)]


def test_mixture_proportions_and_own_streams(tmp_path, processor) -> None:
    a = _text_shards(tmp_path, "a", 3, 40)
    b = _text_shards(tmp_path, "b", 2, 40)
    sources = {"a": {"train": a, "format": "text", "weight": 0.7},
               "b": {"train": b, "format": "text", "weight": 0.3, "shuffle_buffer": 0}}
    dm = DataModule(processor, sources=sources, batch_size=50, num_workers=0, shuffle_buffer=30, seed=2)
    stream = iter(dm.train_dataloader())
    keys = [k for _ in range(60) for k in next(stream)["keys"]]
    share = Counter(k[0] for k in keys)["a"] / len(keys)
    assert len(keys) == 3000 and abs(share - 0.7) < 0.03
    # source b has no shuffle buffer: shard after shard, samples in order; source a's buffer shuffles them
    b_index = [int(k.split("-")[2]) for k in keys if k.startswith("b")]
    assert all(j == (i + 1) % 40 for i, j in zip(b_index, b_index[1:]))
    a_index = [int(k.split("-")[2]) for k in keys if k.startswith("a")]
    assert sum(j != (i + 1) % 40 for i, j in zip(a_index, a_index[1:])) > len(a_index) // 2


def test_mixture_of_formats_and_missing_source_shards(tmp_path, shapes, processor) -> None:
    text = _text_shards(tmp_path, "t", 1, 20)
    sources = {"captions": {"train": str(shapes / "train.txt"), "format": "caption", "weight": 0.5},
               "plain": {"train": text, "format": "text", "weight": 0.5}}
    dm = DataModule(processor, sources=sources, format="conversation", batch_size=16, num_workers=0, seed=0)
    batch = next(iter(dm.train_dataloader()))
    image_id = processor.image_token_id
    per_row = (batch["input_ids"] == image_id).sum(1).tolist()
    captions = [k.startswith("train-") for k in batch["keys"]]
    assert 0 < sum(captions) < 16
    assert per_row == [2 if c else 0 for c in captions]  # captions carry their image, plain text none
    assert batch["pixel_values"].shape[0] == sum(captions)
    with pytest.raises(FileNotFoundError, match=r"data source 'plain'.*nothing-\{0\.\.3\}\.tar"):
        DataModule(processor, sources={**sources, "plain": {"train": str(tmp_path / "nothing-{0..3}.tar")}})
    with pytest.raises(ValueError, match="not both"):
        DataModule(processor, train=text, sources=sources)


def test_virtual_epochs(shapes, processor) -> None:
    dm = DataModule(processor, str(shapes / "train.txt"), format="text", batch_size=4, num_workers=2,
                    batches_per_epoch=5, shuffle_buffer=5, seed=0)
    loader = dm.train_dataloader()
    epochs = []
    for _ in range(2):
        batches = list(loader)
        for batch in batches:
            dm.record_batch(batch)
        epochs.append(batches)
    assert [len(e) for e in epochs] == [5, 5]
    assert [b["stream"]["index"] for e in epochs for b in e] == list(range(10))
    assert [b["stream"]["epoch"] for e in epochs for b in e] == [0] * 5 + [1] * 5
    assert epochs[0][0]["keys"] != epochs[1][0]["keys"]


# ---------------------------------------------------------------- inside Lightning


class Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(list(batch["keys"]))
        return (self.weight * batch["pixel_values"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    name = "memory"
    version = "0"

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def _trainer(tmp_path: Path, steps: int, logger=None, callbacks=()) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=steps, logger=logger or False, callbacks=list(callbacks),
                     enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                     default_root_dir=str(tmp_path), num_sanity_val_steps=0)


def test_lightning_checkpoint_resumes_the_stream_exactly(tmp_path, dirty, processor) -> None:
    kwargs = dict(format="caption", batch_size=3, num_workers=2, shuffle_buffer=10, seed=9)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3,
                                                     save_top_k=-1, filename="{step}")
    logger = MemoryLogger()
    full = Recorder()
    _trainer(tmp_path, 7, logger, [checkpoint]).fit(full, datamodule=DataModule(processor, dirty, **kwargs))
    assert len(full.seen) == 7

    resumed = Recorder()
    dm = DataModule(processor, dirty, **kwargs)
    _trainer(tmp_path, 7).fit(resumed, datamodule=dm, ckpt_path=str(tmp_path / "ckpt" / "step=3.ckpt"))
    assert resumed.seen == full.seen[3:]
    assert dm.progress.served == 7

    logged = {k: v for _, row in logger.rows for k, v in row.items() if k.startswith("data/")}
    assert logged["data/skipped/corrupt_image"] >= 1 and logged["data/skipped/missing_caption"] >= 1
    assert logged["data/skipped"] == logged["data/skipped/corrupt_image"] + logged["data/skipped/missing_caption"]
    state = torch.load(tmp_path / "ckpt" / "step=3.ckpt", weights_only=False)["DataModule"]
    assert state["served"] == 3 and len(state["positions_by_rank"][0]) == 2


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("data", ["shapes", "mixture_example"])
def test_data_configs_instantiate(shapes, processor, data) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("train", overrides=[f"data={data}", "stage=sft", f"paths.data_dir={shapes.parent}",
                                          "data.num_workers=0", "data.batch_size=8"])
    node = OmegaConf.to_container(cfg.data, resolve=True)
    node.pop("prepare")
    dm = instantiate(node)(processor=processor)
    assert [s.name for s in dm.sources] == (["train"] if data == "shapes" else ["captions", "qa"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and (batch["labels"] != -100).any()
    assert len(next(iter(dm.val_dataloader()))["keys"]) == 8


def test_two_phase_processing_equals_one_by_one(tmp_path, processor, monkeypatch) -> None:
    """Images per sample, then the batch's text in a row (`Processor.prepare` / `finish`): the same batches, raw
    positions and skips as processing each sample whole, with bad samples failing in either phase."""
    from vlm.data.stream import SampleFn

    urls = []
    for shard in range(4):  # 5 good samples each: 6 full batches and a partial one
        path = tmp_path / f"mixed-{shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for j in range(11):
                png = _png(shard * 11 + j)
                sample = {"__key__": f"m{shard}-{j}", "png": png[:30] if j % 5 == 2 else png}  # decode fails
                if j % 4 != 3:  # else: no json, the record fails
                    words = 300 if j % 3 == 0 else 2  # no reply left within max_length 128: the text phase fails
                    question = " ".join(f"w{shard}{j}" for _ in range(words))
                    turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": f"a{j}"}]
                    sample["json"] = json.dumps({"conversations": turns}).encode()
                sink.write(sample)
        urls.append(str(path))

    def run() -> tuple[list[dict], dict]:
        dm = DataModule(processor, urls, format="conversation", batch_size=3, num_workers=0, shuffle_buffer=5,
                        resampled=False, shardshuffle=True, seed=3)
        return list(dm.train_dataloader()), dm.skipped()

    sizes: list[int] = []
    finish = Processor.finish
    monkeypatch.setattr(Processor, "finish", lambda self, items: sizes.append(len(items)) or finish(self, items))
    batches, skipped = run()
    assert max(sizes) == 3 and min(sizes) < 3  # whole batches at once, and refills after text failures
    assert skipped.get("too_long") and skipped.get("corrupt_image") and skipped.get("missing_json")

    monkeypatch.setattr(SampleFn, "prepare", lambda self, sample, processor=None: (None, self(sample, processor)))
    reference, reference_skipped = run()
    assert skipped == reference_skipped
    assert len(batches) == len(reference) and len(batches[-1]["keys"]) < 3  # the partial last batch too
    for a, b in zip(batches, reference):
        assert _same(a, b) and torch.equal(a["labels"], b["labels"])
