"""Nearest tokens on a tiny model: one token per patch, the right neighbour when a feature is a word's embedding,
and the PNG and the printed counts of the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm.analysis.nearest_tokens import main, nearest_tokens, token_grid


@pytest.fixture(scope="module")
def model_and_dir(tmp_path_factory, tiny_shapes):
    from test_generation import tiny_vlm

    root, shapes = tmp_path_factory.mktemp("nearest"), tiny_shapes
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = tiny_vlm(shapes / "tokenizer")
    Image.new("RGB", (40, 40), (240, 205, 20)).save(root / "yellow.png")
    yield model, tokenizer, model.save_pretrained(root / "model", tokenizer)
    torch.set_num_threads(before)


@pytest.mark.parametrize(("n", "grid", "expected"), [(16, (4, 4), (4, 4, 0)), (17, (4, 4), (4, 4, 1)),
                                                    (4, (4, 4), (2, 2, 0)), (6, (4, 6), (2, 3, 0))])
def test_token_grid(n: int, grid: tuple[int, int], expected: tuple[int, int, int]) -> None:
    assert token_grid(n, grid) == expected


def test_token_grid_rejects_counts_that_are_no_grid() -> None:
    with pytest.raises(ValueError):
        token_grid(5, (4, 4))


def test_a_feature_equal_to_a_word_embedding_finds_that_word(model_and_dir) -> None:
    model, tokenizer, _ = model_and_dir
    words = ["red", "circle", "square", "blue"] * 4  # one per patch of the 4x4 grid
    ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"][-1] for w in words]
    table = model.decoder.get_input_embeddings().weight
    hook = model.projector.register_forward_hook(lambda m, a, out: 3.0 * table[ids][None].to(out.dtype))
    try:
        result = nearest_tokens(model, tokenizer, Image.new("RGB", (16, 16)))
    finally:
        hook.remove()
    assert result.grid == (4, 4) and len(result.tokens) == 16
    assert result.ids == ids and result.tokens == words
    assert result.similarity == pytest.approx([1.0] * 16, abs=1e-5)
    assert result.most_common(2) == [("red", 4), ("circle", 4)]


def test_special_tokens_are_not_candidates(model_and_dir) -> None:
    model, tokenizer, _ = model_and_dir
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    table = model.decoder.get_input_embeddings().weight
    hook = model.projector.register_forward_hook(lambda m, a, out: table[[image_id] * 16][None].to(out.dtype))
    try:
        result = nearest_tokens(model, tokenizer, Image.new("RGB", (16, 16)))
        with_special = nearest_tokens(model, tokenizer, Image.new("RGB", (16, 16)), include_special=True)
    finally:
        hook.remove()
    assert image_id not in result.ids
    assert with_special.ids == [image_id] * 16


def test_command_line_prints_counts_and_writes_the_picture(model_and_dir, tmp_path: Path, capsys) -> None:
    model, tokenizer, model_dir = model_and_dir
    out = tmp_path / "words.png"
    result = main([f"model_dir={model_dir}", f"image={model_dir.parent / 'yellow.png'}", f"out={out}", "top=3"])
    assert len(result.tokens) == 16 == model.encoder.grid[0] * model.encoder.grid[1]  # one per patch
    assert Image.open(out).size == (768, 768)
    printed = capsys.readouterr().out
    word, count = result.most_common(1)[0]
    assert f"{count:5d}  {word!r}" in printed and "4x4 image tokens" in printed


def test_tiled_model_one_word_per_tile_token(model_and_dir, tmp_path: Path, capsys) -> None:
    """A tiled model (max_tiles 4): a 40 px picture is a 2x2 grid of 16 px tiles plus a thumbnail; every tile token
    gets its word, each tile is its own grid, and the picture shows the tiles beside the thumbnail."""
    from vlm.models.vlm import VisionLanguageModel

    _, _, model_dir = model_and_dir
    model, tokenizer = VisionLanguageModel.from_pretrained(model_dir)
    model.config["max_tiles"] = 4
    tiled_dir = model.save_pretrained(tmp_path / "tiled", tokenizer)
    out = tmp_path / "tiled.png"
    result = main([f"model_dir={tiled_dir}", f"image={model_dir.parent / 'yellow.png'}", f"out={out}"])
    per_tile = model.tokens_per_image
    assert result.tile_grid == (2, 2) and len(result.tiles) == 4 and result.thumbnail is not None
    assert all(len(tile.tokens) == per_tile == 16 and tile.grid == (4, 4) for tile in result.tiles)
    assert len(result.thumbnail.tokens) == per_tile and len(result.tokens) == 5 * per_tile
    # the words of the tile at row 1, column 2 (and of the thumbnail) come from that tile's own features
    from vlm.data.images import ImageTransform

    with Image.open(model_dir.parent / "yellow.png") as opened:
        image = opened.convert("RGB")
    pixels, grid = ImageTransform(16, model.encoder.image_mean, model.encoder.image_std, max_tiles=4)(image)
    assert grid == (2, 2) and pixels.shape[0] == 5
    table = torch.nn.functional.normalize(model.decoder.get_input_embeddings().weight[: len(tokenizer)], dim=-1)
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    with torch.no_grad():
        for index, view in ((1, result.tiles[1]), (4, result.thumbnail)):
            embedded = model.eval().encode_images(pixels[index:index + 1])[0]
            sim = torch.nn.functional.normalize(embedded, dim=-1) @ table.T
            sim[:, sorted(i for i in special if i < len(tokenizer))] = float("-inf")
            assert view.ids == sim.argmax(-1).tolist()
    assert Image.open(out).size == (2 * 768 + 16, 768)
    assert "2x2 tiles + a thumbnail, 4x4 image tokens each (80 in all)" in capsys.readouterr().out
