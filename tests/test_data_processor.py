"""Processor, image tiling and collation: labels, <image> expansion, truncation, padding."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlm.data.collate import Collator
from vlm.data.formats import Record
from vlm.data.images import ImageTransform, choose_grid, image_placeholder
from vlm.data.processor import IGNORE_INDEX, Processor, TruncationError
from vlm.data.synthetic.shapes import ensure_shapes
from vlm.data.tokens import GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN, load_tokenizer, tile_token

T = 3  # tokens per image tile
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = ensure_shapes(tmp_path_factory.mktemp("tok") / "shapes", num_train=60, num_val=10, num_test=10,
                         samples_per_shard=60)
    return load_tokenizer(str(root / "tokenizer"), max_tiles=4)


def processor(tokenizer, max_length: int = 256, max_tiles: int = 1) -> Processor:
    return Processor(tokenizer, ImageTransform(16, MEAN, STD, max_tiles=max_tiles), tokens_per_image=T,
                     max_length=max_length)


def image(w: int = 20, h: int = 20, color=(200, 10, 10)) -> Image.Image:
    return Image.new("RGB", (w, h), color)


def two_turns() -> Record:
    return Record(
        messages=[
            {"role": "user", "content": "<image>\nwhat color is the circle?"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "where is the red circle?"},
            {"role": "assistant", "content": "top left"},
        ],
        images=[image()],
        meta={"key": "k1"},
    )


def labelled_runs(out: dict) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(out["input_ids"].tolist(), out["labels"].tolist()):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_labels_cover_only_assistant_replies_and_their_end(tokenizer) -> None:
    out = processor(tokenizer)(two_turns())
    runs = [tokenizer.decode(r) for r in labelled_runs(out)]
    assert runs == ["red<|im_end|>", "top left<|im_end|>"]
    text = tokenizer.decode(out["input_ids"])
    assert text.endswith("top left<|im_end|>\n")
    assert out["labels"][-1] == IGNORE_INDEX  # the newline after the end token is not a target
    assert out["pixel_values"].shape == (1, 3, 16, 16)


def test_labels_with_another_chat_template(tokenizer) -> None:
    """A Llama-3-style template (no newline after the end token, a system header): spans still found."""
    template = (
        "{{ '<|im_start|>system<|im_end|>' }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + ': ' + "
        "m['content'] + '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant: ' }}"
        "{% endif %}"
    )
    old = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        out = processor(tokenizer)(two_turns())
    finally:
        tokenizer.chat_template = old
    runs = [tokenizer.decode(r) for r in labelled_runs(out)]
    assert [r.strip() for r in runs] == ["red<|im_end|>", "top left<|im_end|>"]
    assert out["labels"][-1] != IGNORE_INDEX


def test_text_record_labels_everything_and_ends_with_eos(tokenizer) -> None:
    out = processor(tokenizer)(Record(text="a red circle at the top left.", meta={"key": "t"}))
    assert torch.equal(out["input_ids"], out["labels"])
    assert out["input_ids"][-1] == tokenizer.eos_token_id
    assert "pixel_values" not in out
    assert tokenizer.decode(out["input_ids"][:-1]) == "a red circle at the top left."


def test_two_images_expand_in_order(tokenizer) -> None:
    record = Record(
        messages=[{"role": "user", "content": "<image> and <image>: same colour?"},
                  {"role": "assistant", "content": "no"}],
        images=[image(color=(255, 0, 0)), image(color=(0, 0, 255))],
        meta={"key": "two"},
    )
    out = processor(tokenizer)(record)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids = out["input_ids"].tolist()
    assert ids.count(image_id) == 2 * T
    assert out["pixel_values"].shape == (2, 3, 16, 16)
    assert out["pixel_values"][0, 0].mean() > out["pixel_values"][1, 0].mean()  # red first, then blue
    assert all(out["labels"][i] == IGNORE_INDEX for i, t in enumerate(ids) if t == image_id)
    first = ids.index(image_id)
    assert ids[first : first + T] == [image_id] * T  # one contiguous run per image


def test_tile_grid_choice() -> None:
    assert choose_grid(256, 64, 64, 4) == (1, 4)  # wide
    assert choose_grid(64, 192, 64, 4) == (3, 1)  # tall
    assert choose_grid(128, 128, 64, 4) == (2, 2)  # square and big enough for 4 tiles
    assert choose_grid(40, 40, 64, 4) == (1, 1)  # small square: no upscaling into tiles
    assert choose_grid(128, 64, 64, 4) == (1, 2)
    assert choose_grid(1000, 64, 64, 4) == (1, 4)  # the widest grid available
    assert choose_grid(256, 64, 64, 1) == (1, 1)


def test_tiled_transform_and_markers_in_order(tokenizer) -> None:
    transform = ImageTransform(16, MEAN, STD, max_tiles=4)
    wide = Image.new("RGB", (64, 16))
    wide.paste((255, 0, 0), (0, 0, 16, 16))  # leftmost tile red, the rest black
    tiles, grid = transform(wide)
    assert grid == (1, 4) and tiles.shape == (5, 3, 16, 16)
    assert tiles[0, 0].mean() > tiles[1, 0].mean()  # row-major: the red tile comes first
    placeholder = image_placeholder((2, 2), T)
    expected = "".join(tile_token(r, c) + IMAGE_TOKEN * T for r in (1, 2) for c in (1, 2))
    assert placeholder == expected + GLOBAL_IMAGE_TOKEN + IMAGE_TOKEN * T
    assert image_placeholder((1, 1), T) == IMAGE_TOKEN * T

    record = Record(messages=[{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}],
                    images=[Image.new("RGB", (32, 32))], meta={"key": "tiled"})
    out = processor(tokenizer, max_tiles=4)(record)
    assert out["pixel_values"].shape == (5, 3, 16, 16)
    tokens = tokenizer.convert_ids_to_tokens(out["input_ids"].tolist())
    markers = [t for t in tokens if t.startswith("<row_") or t == GLOBAL_IMAGE_TOKEN]
    assert markers == ["<row_1_col_1>", "<row_1_col_2>", "<row_2_col_1>", "<row_2_col_2>", GLOBAL_IMAGE_TOKEN]
    assert tokens.count(IMAGE_TOKEN) == 5 * T


def test_truncation_cuts_text_but_never_an_image(tokenizer) -> None:
    long_reply = " ".join(["red"] * 100)
    record = Record(messages=[{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": long_reply}],
                    images=[image()], meta={"key": "long"})
    out = processor(tokenizer, max_length=40)(record)
    assert len(out["input_ids"]) == 40 and len(out["labels"]) == 40
    assert (out["labels"] != IGNORE_INDEX).any()
    text = Record(text=long_reply, meta={"key": "t"})
    assert len(processor(tokenizer, max_length=10)(text)["input_ids"]) == 10

    late_image = Record(messages=[{"role": "user", "content": long_reply + " <image>"},
                                  {"role": "assistant", "content": "ok"}], images=[image()], meta={"key": "late"})
    with pytest.raises(ValueError, match=r"'late'.*max_length 40"):
        processor(tokenizer, max_length=40)(late_image)
    # a cut inside the image's run (image tokens at 3.. with T=3, cut at 4) is refused too
    with pytest.raises(TruncationError, match="image"):
        processor(tokenizer, max_length=4)(record)


def test_prompt_ends_with_generation_prompt(tokenizer) -> None:
    out = processor(tokenizer).prompt(two_turns())
    assert "labels" not in out and out["key"] == "k1"
    text = tokenizer.decode(out["input_ids"])
    assert text.endswith("where is the red circle?<|im_end|>\n<|im_start|>assistant\n")
    assert "top left" not in text and out["pixel_values"].shape[0] == 1


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_padding_and_masks(tokenizer, side: str) -> None:
    proc = processor(tokenizer)
    short = proc(Record(messages=[{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "red"}],
                        images=[image()], meta={"key": "a"}))
    long = proc(two_turns())
    text_only = proc(Record(text="a red circle.", meta={"key": "c"}))
    batch = Collator(tokenizer.pad_token_id, padding_side=side)([short, long, text_only])
    assert batch["keys"] == ["a", "k1", "c"]
    length = len(long["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, length)
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    n = len(short["input_ids"])
    mask = batch["attention_mask"][0]
    assert mask.sum() == n and batch["attention_mask"][1].all()
    real = slice(0, n) if side == "right" else slice(length - n, length)
    pad = slice(n, length) if side == "right" else slice(0, length - n)
    assert mask[real].all() and not mask[pad].any()
    assert torch.equal(batch["input_ids"][0, real], short["input_ids"])
    assert (batch["input_ids"][0, pad] == tokenizer.pad_token_id).all()
    assert (batch["labels"][0, pad] == IGNORE_INDEX).all()
    assert torch.equal(batch["labels"][0, real], short["labels"])


def test_fast_paths_agree_with_the_tokenizer_and_fall_back(tokenizer, monkeypatch) -> None:
    """The direct jinja render and the Rust encode are checked against Hugging Face's calls on first use."""
    import pickle

    from vlm.data.processor import ChatRenderer

    messages = two_turns().messages
    renderer = ChatRenderer(tokenizer, checks=2)
    for generation in (False, True, False):
        assert renderer(messages, generation) == tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation)
    assert renderer._direct and renderer._checks_left == 0
    clone = pickle.loads(pickle.dumps(renderer))  # workers get a copy: it recompiles and checks again
    assert clone(messages) == renderer(messages) and clone._checks_left == 1

    proc = processor(tokenizer)
    text = proc.render(messages)
    ids, offsets = proc._encode(text)
    assert (ids, offsets) == proc._encode_reference(text) and proc._backend is not None

    # a wrapper that renders differently (a template variable the shortcut does not know): back to the wrapper
    real = type(tokenizer).apply_chat_template
    monkeypatch.setattr(type(tokenizer), "apply_chat_template",
                        lambda self, *a, **k: "<sys>" + real(self, *a, **k))
    other = ChatRenderer(tokenizer)
    assert other(messages).startswith("<sys>") and not other._direct
    assert other(messages).startswith("<sys>")


def test_direct_render_matches_the_wrapper_unchecked(tokenizer, monkeypatch) -> None:
    """The direct render (no checks against the wrapper at all) on a template with top-level `set`s, a namespace,
    filters, special tokens and a global: the same text as `apply_chat_template`, call after call."""
    from vlm.data.processor import ChatRenderer

    template = (
        "{% set ns = namespace(n=0) %}{% set sep = '|' %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "{{ bos_token or '' }}{{ m['role'] }}{{ sep }}{{ m['content'] | trim }}#{{ ns.n }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant|{% endif %}"
        "{% if messages | length > 9 %}{{ raise_exception('too long') }}{% endif %}"
    )
    monkeypatch.setattr(tokenizer, "chat_template", template)
    renderer = ChatRenderer(tokenizer, checks=0)
    conversations = [two_turns().messages, two_turns().messages[:2], [{"role": "user", "content": "  hi  "}]]
    for messages in conversations * 2:
        for generation in (False, True):
            text = renderer(messages, generation)
            assert text == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
            assert text.count("#") == len(messages)
    assert renderer._direct
