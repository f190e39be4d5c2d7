"""The chat: history kept in the chat template across turns, usable from Python and from the terminal loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm.chat import ChatSession, add_chat_method, chat, main, with_image_tags
from vlm.evaluation.answerer import Answerer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_shapes: Path) -> Path:
    from test_generation import tiny_vlm

    root, shapes = tmp_path_factory.mktemp("chat"), tiny_shapes
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = tiny_vlm(shapes / "tokenizer")
    Image.new("RGB", (24, 24), (30, 70, 220)).save(root / "blue.png")
    yield model.save_pretrained(root / "model", tokenizer)
    torch.set_num_threads(before)


class Recording(Answerer):
    """Records the token ids of every prompt it is asked to answer."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prompts: list[str] = []

    def generate(self, conversations, **kwargs):
        for messages, images in conversations:
            self.prompts.append(self.tokenizer.decode(self.prompt(messages, images)["input_ids"]))
        return super().generate(conversations, **kwargs)


def test_image_tags_are_added_where_missing() -> None:
    messages = [{"role": "user", "content": "what is this?"}]
    assert with_image_tags(messages, 2)[0]["content"] == "<image><image>\nwhat is this?"
    assert with_image_tags([{"role": "user", "content": "<image>\nhi"}], 1)[0]["content"] == "<image>\nhi"
    with pytest.raises(ValueError):
        with_image_tags([{"role": "user", "content": "<image><image>"}], 1)


def test_session_keeps_the_history_in_the_chat_template(model_dir: Path) -> None:
    from vlm.models.vlm import VisionLanguageModel

    model, tokenizer = VisionLanguageModel.from_pretrained(model_dir)
    answerer = Recording(model, tokenizer)
    session = ChatSession(answerer, max_new_tokens=4)
    session.add_image(model_dir.parent / "blue.png")
    first = session.send("what color is the square?")
    second = session.send("and its shape?")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[0]["content"] == "<image>\nwhat color is the square?"
    assert session.messages[1]["content"] == first and session.messages[3]["content"] == second
    turn2 = answerer.prompts[1]
    assert turn2.count("<|im_start|>user") == 2 and "what color is the square?" in turn2
    assert f"<|im_start|>assistant\n{first}<|im_end|>" in turn2  # the first reply is part of the second prompt
    assert turn2.endswith("<|im_start|>assistant\n")
    # the reply is what the model says to the whole history at once (greedy)
    assert second == chat(model, tokenizer, session.images, session.messages[:3], max_new_tokens=4)


def test_chat_function_and_method_agree(model_dir: Path) -> None:
    from vlm.models.vlm import VisionLanguageModel

    model, tokenizer = VisionLanguageModel.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "what color is the square?"}]
    reply = chat(model, tokenizer, [str(model_dir.parent / "blue.png")], messages, max_new_tokens=5)
    add_chat_method(model, tokenizer)
    assert model.chat([Image.open(model_dir.parent / "blue.png")], messages, max_new_tokens=5) == reply
    assert "chat" not in dict(model.named_modules())  # a method, not a submodule or a weight


def test_terminal_loop(model_dir: Path) -> None:
    lines = iter([f"/image {model_dir.parent / 'blue.png'}", "what color is it?", "/image /no/such.png", "",
                  "and now?", "/reset", "hello", "/quit", "never read"])
    out: list[str] = []
    session = main([f"model_dir={model_dir}", "max_new_tokens=3"], read=lambda _: next(lines), write=out.append)
    assert sum(o.startswith("model> ") for o in out) == 3
    assert any("cannot open" in o for o in out) and "(conversation cleared)" in out
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["hello"]  # after /reset
    assert next(lines) == "never read"  # /quit stopped reading


def test_typed_image_tag_and_line_breaks(model_dir: Path) -> None:
    """After /image, `<image>` written in the message places the picture there (the quickstart's layout); `\\n`
    and a line ending in `\\` give line breaks."""
    lines = iter([f"/image {model_dir.parent / 'blue.png'}", r"what color is the circle?\n<image>",
                  f"/image {model_dir.parent / 'blue.png'}", "first line \\", "<image> second line", "/quit"])
    out: list[str] = []
    session = main([f"model_dir={model_dir}", "max_new_tokens=2"], read=lambda _: next(lines), write=out.append)
    assert not any(o.startswith("(error") for o in out) and sum(o.startswith("model> ") for o in out) == 2
    users = [m["content"] for m in session.messages if m["role"] == "user"]
    assert users == ["what color is the circle?\n<image>", "first line \n<image> second line"]
    assert len(session.images) == 2
