"""The synthetic shapes world: deterministic, cached, and its text agrees with the drawn objects."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm.data.synthetic.shapes import COLORS, POSITIONS, ensure_shapes
from vlm.data.tokens import IM_END, IMAGE_TOKEN, PAD_TOKEN, load_tokenizer, tile_token, vlm_special_tokens

SMALL = dict(num_train=120, num_val=20, num_test=20, samples_per_shard=50)


def _digest(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("*.tar"))}


def _samples(path: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return ensure_shapes(tmp_path_factory.mktemp("shapes") / "shapes", **SMALL)


def test_layout_and_shard_lists(shapes: Path) -> None:
    info = json.loads((shapes / "info.json").read_text())
    assert info["counts"] == {"train": 120, "val": 20, "test": 20}
    assert (shapes / "train.txt").read_text().split() == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    sizes = [len(_samples(shapes / n)) for n in ("train-000000.tar", "train-000001.tar", "train-000002.tar")]
    assert sizes == [50, 50, 20]
    sample = _samples(shapes / "val-000000.tar")["val-000000"]
    assert set(sample) == {"png", "txt", "json"}
    assert Image.open(io.BytesIO(sample["png"])).size == (64, 64)


def test_deterministic_and_seeded(tmp_path: Path, shapes: Path) -> None:
    again = ensure_shapes(tmp_path / "a", **SMALL)
    assert _digest(again) == _digest(shapes)  # byte-identical shards
    other = ensure_shapes(tmp_path / "b", **{**SMALL, "seed": 1})
    assert _digest(other) != _digest(shapes)


def test_cached_unless_parameters_change_or_interrupted(tmp_path: Path) -> None:
    root = ensure_shapes(tmp_path / "s", **SMALL)
    shard = root / "train-000000.tar"
    mtime = shard.stat().st_mtime_ns
    ensure_shapes(root, **SMALL)
    assert shard.stat().st_mtime_ns == mtime, "same parameters must not regenerate"
    ensure_shapes(root, **{**SMALL, "num_val": 10})
    assert shard.stat().st_mtime_ns != mtime, "new parameters must regenerate"
    assert len(_samples(root / "val-000000.tar")) == 10
    (root / "info.json").unlink()  # what an interrupted run leaves behind
    mtime = shard.stat().st_mtime_ns
    ensure_shapes(root, **{**SMALL, "num_val": 10})
    assert shard.stat().st_mtime_ns != mtime and (root / "info.json").exists()
    assert not list(root.glob(".tmp-*")), "temporary directory left behind"


def _quadrant_color(image: np.ndarray, position: str) -> set[tuple[int, int, int]]:
    half = image.shape[0] // 2
    row, col = divmod(POSITIONS.index(position), 2)
    patch = image[row * half : (row + 1) * half, col * half : (col + 1) * half].reshape(-1, 3)
    return {tuple(int(v) for v in p) for p in patch}


def test_text_agrees_with_objects_and_pixels(shapes: Path) -> None:
    samples = _samples(shapes / "train-000000.tar")
    singles = 0
    for key, raw in samples.items():
        meta = json.loads(raw["json"])
        objects = meta["objects"]
        assert 1 <= len(objects) <= 4
        assert len({o["position"] for o in objects}) == len(objects)
        assert raw["txt"].decode() == meta["caption"]
        for o in objects:
            assert f"{o['color']} {o['shape']} at the {o['position']}" in meta["caption"]
        # each object's colour is really drawn in its quadrant, and no empty quadrant holds a shape colour
        pixels = np.asarray(Image.open(io.BytesIO(raw["png"])).convert("RGB"))
        occupied = {o["position"]: COLORS[o["color"]] for o in objects}
        for position in POSITIONS:
            colors = _quadrant_color(pixels, position)
            if position in occupied:
                assert occupied[position] in colors, (key, position)
            else:
                assert not colors & set(COLORS.values()), (key, position)
        for qa in meta["qa"]:
            answer, question = qa["answer"], qa["question"]
            assert answer == answer.lower() and qa["type"] in {"color", "shape", "count", "position"}
            if qa["type"] == "count":
                assert answer == str(len(objects))
            elif qa["type"] == "color":
                shape = question.removeprefix("what color is the ").removesuffix("?")
                matches = [o for o in objects if o["shape"] == shape]
                assert len(matches) == 1 and matches[0]["color"] == answer
            elif qa["type"] == "shape":
                color = question.removeprefix("what shape is the ").removesuffix(" object?")
                matches = [o for o in objects if o["color"] == color]
                assert len(matches) == 1 and matches[0]["shape"] == answer
            else:
                color, shape = question.removeprefix("where is the ").removesuffix("?").split()
                matches = [o for o in objects if (o["color"], o["shape"]) == (color, shape)]
                assert len(matches) == 1 and matches[0]["position"] == answer
        turns = meta["conversations"]
        assert [t["role"] for t in turns] == ["user", "assistant"]  # one question per picture
        assert turns[0]["content"].endswith("\n" + IMAGE_TOKEN)  # question first, then the picture
        assert sum(t["content"].count(IMAGE_TOKEN) for t in turns) == 1
        qa_pairs = {(q["question"], q["answer"]) for q in meta["qa"]}
        for user, assistant in zip(turns[::2], turns[1::2]):
            assert (user["content"].removesuffix("\n" + IMAGE_TOKEN), assistant["content"]) in qa_pairs
        if len(objects) == 1:
            singles += 1
            assert meta["label"] == {"shape": objects[0]["shape"], "color": objects[0]["color"]}
        else:
            assert meta["label"] is None
    assert 5 <= singles <= 30  # about 30% of 50


def test_tokenizer_round_trip(shapes: Path) -> None:
    tokenizer = load_tokenizer(str(shapes / "tokenizer"))
    size = len(tokenizer)
    assert 300 <= size <= 1100
    for token in vlm_special_tokens(4):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.eos_token == IM_END
    assert len(tokenizer) == size, "special tokens were already in the saved tokenizer"
    assert tokenizer(f"{IMAGE_TOKEN}{IMAGE_TOKEN}{tile_token(1, 2)}x", add_special_tokens=False)["input_ids"][:3] == [
        tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)] * 2 + [tokenizer.convert_tokens_to_ids(tile_token(1, 2))]
    text = "a red circle at the top left and an orange square at the bottom right."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and len(ids) < 20  # the words were learned as merges
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}], tokenize=False
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
