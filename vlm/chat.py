"""Talk to a model directory about images, in the terminal or from Python.

    python -m vlm.chat model_dir=PATH [image=PATH] [max_new_tokens=256] [temperature=0] [top_p=1] [system=TEXT]
                       [device=auto] [dtype=auto] [trust_remote_code=false]

In the terminal: `/image PATH` adds an image to your next message, `/reset` forgets the conversation, `/quit` (or
end of input) leaves. Write `<image>` in the message to place the image there (otherwise it goes before the text);
type `\n` for a line break, or end a line with `\\` to continue the message on the next line. The whole history is
rendered with the model's chat template every turn, so the model sees earlier questions, answers and images exactly
as a multi-turn training sample.

From Python: `chat(model, tokenizer, images, messages)` returns the reply; `add_chat_method(model, tokenizer)` gives
the model a `model.chat(images, messages)` method (without touching the model class).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from types import MethodType
from typing import Any

from PIL import Image
from torch import nn

from vlm.cli import REQUIRED, parse_options
from vlm.evaluation.answerer import Answerer
from vlm.evaluation.sources import load_image

IMAGE_TAG = "<image>"


def with_image_tags(messages: Sequence[dict[str, str]], n_images: int) -> list[dict[str, str]]:
    """Messages whose `<image>` tags cover `n_images`: missing tags go to the start of the first user turn (LLaVA)."""
    messages = [dict(m) for m in messages]
    missing = n_images - sum(m["content"].count(IMAGE_TAG) for m in messages)
    if missing < 0:
        raise ValueError(f"the messages hold more {IMAGE_TAG} tags than the {n_images} images given")
    if missing:
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise ValueError("images need a user message to go with")
        first["content"] = IMAGE_TAG * missing + "\n" + first["content"]
    return messages


def chat(model: nn.Module, tokenizer: Any, images: Sequence[Image.Image | str], messages: Sequence[dict[str, str]],
         max_new_tokens: int = 256, answerer: Answerer | None = None, **generation: Any) -> str:
    """The assistant's reply to `messages` (ending with a user turn) about `images` (PIL images or paths).

    generation: temperature, top_p, num_beams, generator (greedy by default).
    """
    answerer = answerer or Answerer(model, tokenizer)
    pictures = [load_image(i) for i in images]
    conversation = (with_image_tags(messages, len(pictures)), pictures)
    return answerer.generate([conversation], max_new_tokens=max_new_tokens, **generation)[0]


def add_chat_method(model: nn.Module, tokenizer: Any) -> nn.Module:
    """Give `model` a `chat(images, messages, **generation) -> str` method bound to `tokenizer`; returns the model."""
    answerer = Answerer(model, tokenizer)

    def _chat(self: nn.Module, images: Sequence[Image.Image | str], messages: Sequence[dict[str, str]],
              **generation: Any) -> str:
        return chat(self, tokenizer, images, messages, answerer=answerer, **generation)

    object.__setattr__(model, "chat", MethodType(_chat, model))
    return model


class ChatSession:
    """A conversation that grows turn by turn: `add_image(...)`, then `send(text) -> reply`."""

    def __init__(self, answerer: Answerer, system: str | None = None, **generation: Any) -> None:
        self.answerer = answerer
        self.system = system
        self.generation = generation
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        self.images: list[Image.Image] = []
        self._pending = 0  # images added since the last message was sent

    def add_image(self, image: Image.Image | str | Path) -> None:
        self.images.append(load_image(str(image) if isinstance(image, Path) else image))
        self._pending += 1

    def send(self, text: str) -> str:
        """Ask `text`; images added since the last message go where it has `<image>` tags, the rest before it."""
        missing = self._pending - text.count(IMAGE_TAG)
        content = (IMAGE_TAG * missing + "\n" + text) if missing > 0 else text
        messages = [*self.messages, {"role": "user", "content": content}]
        reply = chat(self.answerer.model, self.answerer.tokenizer, self.images, messages, answerer=self.answerer,
                     **self.generation)
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        self._pending = 0
        return reply


def read_message(read: Callable[[str], str]) -> str:
    """One input from the terminal: a line ending in `\\` continues on the next one (joined by a line break)."""
    lines = [read("you> ")]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(read("...> "))
    return "\n".join(lines).strip()


OPTIONS = {"model_dir": REQUIRED, "image": None, "max_new_tokens": 256, "temperature": 0.0, "top_p": 1.0,
           "num_beams": 1, "system": None, "device": "auto", "dtype": "auto", "trust_remote_code": False}


def _options(argv: Sequence[str] | None) -> dict[str, Any]:
    """The command line (vlm.cli: key=value); generation options left at their defaults are not passed on."""
    options = parse_options(argv, "vlm.chat", OPTIONS)
    for key, default in (("temperature", 0.0), ("top_p", 1.0), ("num_beams", 1)):
        if options[key] == default:
            del options[key]
    return options


def main(argv: Sequence[str] | None = None, read: Callable[[str], str] = input,
         write: Callable[[str], None] = print) -> ChatSession:
    """The terminal loop; `read` and `write` stand in for the terminal in tests. Returns the session."""
    options = _options(argv)
    answerer = Answerer.from_dir(options.pop("model_dir"), options.pop("device"), options.pop("dtype"),
                                 options.pop("trust_remote_code"))
    image = options.pop("image", None)
    session = ChatSession(answerer, system=options.pop("system", None), **options)
    if image:
        session.add_image(image)
    write("Chat with the model. /image PATH adds an image (write <image> in your message to place it), /reset starts "
          "over, /quit leaves. \\n is a line break; a line ending in \\ continues on the next.")
    while True:
        try:
            line = read_message(read)
        except EOFError:
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session.reset()
            write("(conversation cleared)")
        elif line.startswith("/image"):
            path = line[len("/image") :].strip()
            try:
                session.add_image(path)
                write(f"(image {path} added to your next message)")
            except (OSError, ValueError, Image.DecompressionBombError) as exc:  # a bomb is refused, the chat goes on
                write(f"(cannot open {path!r}: {exc})")
        else:
            try:
                write("model> " + session.send(line.replace("\\n", "\n")))  # a typed \n is a line break
            except ValueError as exc:  # e.g. the conversation no longer fits the model's max_length
                write(f"(error: {exc})")
    return session


if __name__ == "__main__":
    main()
