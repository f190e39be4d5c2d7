"""Named chat templates (`model.chat_template`): the conversation format a model is trained and prompted with.

Each template renders messages whose `content` is a string with inline `<image>` tags (what the processor passes)
and also the list-of-parts form that transformers' processors and lmms-eval pass (`{"type": "image"}`,
`{"type": "text", "text": ...}`; the parts are joined by a newline, so `[image, text]` renders as `<image>\\n...`,
LLaVA's own layout). So the template written into an exported Hugging Face directory is the training template.

- `chatml`: `<|im_start|>role\\n...<|im_end|>\\n`, the fallback when a tokenizer has none.
- `llava_v1`: the Vicuna v1 conversation LLaVA-1.5 was trained on: BOS, the system line, then
  `USER: ... ASSISTANT: ...</s>` (LLaVA's `conv_vicuna_v1`: separators " " after a user turn, `</s>` after a reply;
  the generation prompt ends in `ASSISTANT:`).
"""
from __future__ import annotations

from typing import Any

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# ChatML; `add_generation_prompt` opens the assistant turn. Each turn ends "<|im_end|>\n".
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Renders a message's content: a string as is, a list of parts joined by newlines.
_CONTENT_MACRO = (
    "{%- macro content(c) -%}"
    "{%- if c is string -%}{{ c }}"
    "{%- else -%}{%- for part in c -%}{%- if not loop.first -%}{{ '\n' }}{%- endif -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>' }}{%- else -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

CHATML = _CONTENT_MACRO + (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content(message['content']) + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")

LLAVA_V1 = _CONTENT_MACRO + (
    "{%- if bos_token -%}{{ bos_token }}{%- endif -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ content(messages[0]['content']) + ' ' }}{%- set turns = messages[1:] -%}"
    "{%- else -%}{{ \"" + LLAVA_V1_SYSTEM + " \" }}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' + content(message['content']) + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + content(message['content']) + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

CHAT_TEMPLATES = {"chatml": CHATML, "llava_v1": LLAVA_V1}

# Templates earlier versions wrote into tokenizers, which render string content exactly as a named one does.
LEGACY_EQUIVALENTS = {CHATML_TEMPLATE: CHATML}


def named_template(name: str) -> str:
    """The jinja text of a named template; unknown names raise with the list of known ones."""
    if name not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat_template {name!r}; known templates: {sorted(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[name]


def template_name(template: str | None) -> str | None:
    """The name of a template text (legacy equivalents included), or None for any other template."""
    template = LEGACY_EQUIVALENTS.get(template, template)
    return next((name for name, text in CHAT_TEMPLATES.items() if text == template), None)


def set_chat_template(tokenizer: Any, name: str) -> Any:
    """Give `tokenizer` the named template (checking it has the tokens that template writes); returns it."""
    template = named_template(name)
    if name == "llava_v1" and tokenizer.eos_token is None:
        raise ValueError("chat_template llava_v1 ends each reply with the eos token, but the tokenizer has none")
    if name == "chatml" and tokenizer.eos_token is None:
        tokenizer.eos_token = IM_END  # the end of a turn is where generation stops
    tokenizer.chat_template = template
    return tokenizer


def renders_plain_messages(tokenizer: Any) -> bool:
    """Whether the tokenizer's template renders string-content messages verbatim (what the processor passes).

    Templates written for lists of parts only (llava-hf's) iterate over a string's characters instead.
    """
    probe = [{"role": "user", "content": "<image>\nwhat is shown here?"},
             {"role": "assistant", "content": "a small red circle"}]
    if not getattr(tokenizer, "chat_template", None):
        return False
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:
        return False
    return all(m["content"] in text for m in probe)
