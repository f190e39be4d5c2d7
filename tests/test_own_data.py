"""Your own data and your own model: `data=shards`, a tokenizer built from your shards, and `init_from` that keeps
the model it loads (its architecture and image size) under the default `model=`."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from vlm.data.bpe import foreign_tokenizer_warning, shard_texts, trained_on, warn_foreign_tokenizer
from vlm.data.convert.__main__ import main as convert
from vlm.data.synthetic.files import write_example_files
from vlm.data.synthetic.shapes import ensure_shapes
from vlm.data.tokens import IMAGE_TOKEN, load_tokenizer, tile_token
from vlm.loading import explicit_model_keys, load_model
from vlm.models.vlm import VisionLanguageModel


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> dict[str, Path]:
    """The shapes world (for its tokenizer) and "own" caption and conversation shards converted from files."""
    root = tmp_path_factory.mktemp("own")
    shapes = ensure_shapes(root / "shapes", num_train=60, num_val=8, num_test=8, samples_per_shard=30)
    files = write_example_files(root / "files", num_train=24, num_test=4)
    assert convert(["images", f"images={files / 'photos'}", f"captions={files / 'captions.csv'}",
                    f"out={root / 'captions'}", "samples_per_shard=10", "quiet=true"]) == 0
    assert convert(["llava", f"json={files / 'conversations.json'}", f"images={files / 'photos'}",
                    f"out={root / 'chat'}", "samples_per_shard=10", "quiet=true"]) == 0
    return {"shapes": shapes, "captions": root / "captions", "chat": root / "chat", "root": root}


# ---- a tokenizer from your shards -------------------------------------------------------------------------------
def test_tokenizer_converter_round_trips_the_shards_text(own: dict[str, Path]) -> None:
    shards = f"{own['captions'] / 'train.txt'}::{own['chat'] / 'train.txt'}"
    out = own["root"] / "tokenizer"
    assert convert(["tokenizer", f"shards={shards}", "vocab_size=400", f"out={out}", "quiet=true"]) == 0
    texts = list(shard_texts(shards))
    assert len(texts) == 24 + sum(1 for _ in shard_texts(str(own["chat"] / "train.txt")))  # captions + turns
    assert any("how many shapes are there?" == t for t in texts) and all(IMAGE_TOKEN not in t for t in texts)
    tokenizer = load_tokenizer(str(out))
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert len(tokenizer) <= 400 and len(tokenizer("a red circle at the top left.")["input_ids"]) < 12  # merges learnt
    for special in (IMAGE_TOKEN, tile_token(2, 2), "<|im_start|>"):
        assert len(tokenizer(special, add_special_tokens=False)["input_ids"]) == 1
    assert trained_on(out) == sorted({str(own["captions"].resolve()), str(own["chat"].resolve())})
    # a stage training a random decoder on these shards: their own tokenizer is fine, the shapes one is not
    assert foreign_tokenizer_warning(out, [shards]) is None
    warning = foreign_tokenizer_warning(own["shapes"] / "tokenizer", [str(own["captions"] / "train.txt")])
    assert warning and "was built for other data" in warning and "vlm.data.convert tokenizer" in warning
    assert foreign_tokenizer_warning(own["shapes"] / "tokenizer", [str(own["shapes"] / "train.txt")]) is None
    # when a stage warns: only for a random decoder or text tower that it trains
    random_decoder = {"decoder": {"pretrained": False}, "tokenizer": str(own["shapes"] / "tokenizer")}
    data = {"train": str(own["captions"] / "train.txt")}
    assert warn_foreign_tokenizer(random_decoder, ["projector", "decoder"], data) is not None
    assert warn_foreign_tokenizer(random_decoder, ["projector"], data) is None
    assert warn_foreign_tokenizer({**random_decoder, "decoder": {"pretrained": True}}, ["decoder"], data) is None
    assert warn_foreign_tokenizer({**random_decoder, "tokenizer": str(out)}, ["decoder"], data) is None
    mixture = {"sources": {"a": {"train": [str(own["shapes"] / "train.txt")]}, "b": data}}
    assert "captions" in warn_foreign_tokenizer(random_decoder, ["decoder"], mixture)


# ---- init_from keeps the model it loads ------------------------------------------------------------------------
def tiled_model_dir(own: dict[str, Path], compose_config) -> Path:
    """A model like the quickstart's (model=tiny_tiled, 4 decoder layers) at 64 px tiles, unlike the default model=
    (32 px, 3 layers), saved."""
    cfg = compose_config("train", [f"paths.data_dir={own['shapes'].parent}", "model=tiny_tiled",
                                   "model.encoder.image_size=64"])
    model, tokenizer = load_model(OmegaConf.to_container(cfg.model, resolve=True))
    return model.save_pretrained(own["root"] / "tiled", tokenizer)


def test_init_from_keeps_the_loaded_image_size_and_architecture(own: dict[str, Path], caplog, monkeypatch,
                                                                 compose_config) -> None:
    monkeypatch.setattr(logging.getLogger("vlm"), "disabled", False)  # hydra/job_logging=disabled elsewhere
    directory = tiled_model_dir(own, compose_config)
    overrides = [f"paths.data_dir={own['shapes'].parent}", "stage=sft", f"init_from={directory}"]
    cfg = compose_config("train", overrides)  # the default model=tiny: 32 px, 3 decoder layers
    assert cfg.model.encoder.image_size == 32 and cfg.model.decoder.config.num_hidden_layers == 3
    with caplog.at_level(logging.WARNING, logger="vlm"):
        model, _ = load_model(OmegaConf.to_container(cfg.model, resolve=True), directory,
                              explicit_model_keys(overrides))
    assert model.encoder.image_size == 64 and model.decoder.config.num_hidden_layers == 4
    assert model.config["max_tiles"] == 4 and not caplog.records
    # the image size (and max_length) change when given explicitly, in one line; the architecture never does
    overrides += ["model.encoder.image_size=32", "model.decoder.config.num_hidden_layers=2"]
    cfg = compose_config("train", overrides)
    with caplog.at_level(logging.WARNING, logger="vlm"):
        model, _ = load_model(OmegaConf.to_container(cfg.model, resolve=True), directory,
                              explicit_model_keys(overrides))
    assert model.encoder.image_size == 32 and model.decoder.config.num_hidden_layers == 4
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"init_from {directory}: changed the loaded model: image size 64 -> 32 px",
                     f"init_from {directory}: the loaded model keeps its architecture; ignored: "
                     "model.decoder.config.num_hidden_layers (only model.encoder.image_size, model.max_length, "
                     "model.chat_template can change)"]


# ---- data=shards: one override -----------------------------------------------------------------------------------
def test_data_shards_trains_with_only_data_train_from_a_loaded_model(own: dict[str, Path], compose_config) -> None:
    """`data=shards data.train=...` (no val, no test, nothing generated) under the default model=, from init_from:
    the stage trains, and the model directory it writes is still the loaded one (64 px tiles, 4 layers)."""
    from vlm.run import run_stage

    directory = own["root"] / "tiled"
    if not directory.exists():
        tiled_model_dir(own, compose_config)
    run_dir = own["root"] / "run"
    overrides = ["stage=align", "data=shards", f"data.train={own['captions'] / 'train.txt'}",
                 f"init_from={directory}", f"run_dir={run_dir}", "paths.data_dir=/nonexistent",
                 "trainer.max_steps=2", "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=0",
                 "logger=none"]
    cfg = compose_config("train", overrides)
    assert cfg.data.val is None and cfg.data.test is None and cfg.data.get("prepare") is None
    model_dir = run_stage(cfg, overrides)
    model, _ = VisionLanguageModel.from_pretrained(model_dir)
    assert model.encoder.image_size == 64 and model.decoder.config.num_hidden_layers == 4
    assert not Path("/nonexistent").exists()  # nothing was generated
    before, _ = VisionLanguageModel.from_pretrained(directory)
    trained = [not torch.equal(a, b) for a, b in zip(model.projector.state_dict().values(),
                                                     before.projector.state_dict().values())]
    assert any(trained)  # align trained the projector
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert list(saved.init_model_keys) == []
    with pytest.raises(ValueError, match="no training data: set data.train="):  # data=shards without data.train says so
        run_stage(compose_config("train", ["stage=align", "data=shards", f"run_dir={run_dir}-x", "logger=none"]), [])


# ---- a real model name offline: one short message ----------------------------------------------------------------
@pytest.mark.slow
def test_offline_model_name_gives_one_short_message(own: dict[str, Path]) -> None:
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(repo)}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, str(repo / "train.py"), "stage=align", "model=llava_7b", "trainer.max_steps=1",
               "data=shards", f"data.train={own['captions'] / 'train.txt'}", f"run_dir={own['root'] / 'offline'}"]
    done = subprocess.run(command, cwd=own["root"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr + done.stdout
    message = errors[0]
    assert "'lmsys/vicuna-7b-v1.5' (model.tokenizer)" in message and "HF_HUB_OFFLINE=0" in message
    assert "hf download lmsys/vicuna-7b-v1.5" in message and "point model.tokenizer at a local directory" in message
    assert len(message) < 600
    output = (done.stdout + done.stderr).splitlines()
    assert sum("Seed set to 0" in line for line in output) == 1  # each log line printed once


def test_named_model_errors_local_and_hub(tmp_path: Path) -> None:
    """A missing local path says so; a local directory that exists but is broken keeps its own error."""
    from vlm.hub import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match=r"'\./nowhere/tokenizer' \(model.tokenizer\): no such local dir"):
        load_tokenizer("./nowhere/tokenizer")
    with pytest.raises(ModelNotFoundError, match="neither a local directory nor in the Hugging Face cache"):
        load_tokenizer("some-org/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception) as raised:
        load_tokenizer(str(tmp_path / "empty"))
    assert not isinstance(raised.value, ModelNotFoundError)
