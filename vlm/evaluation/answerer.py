"""A model directory that answers: conversations with images in, generated text or option log-likelihoods out.

Evaluation tasks and the chat share it, so prompts are always built the way training built them (the model's own
processor and chat template) and generation always stops at the end-of-turn token. It runs on the device the model's
weights are on (`from_dir(..., device=, dtype=)`, vlm.device): inputs are moved there, the KV cache lives there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

Conversation = tuple[list[dict[str, str]], list[Image.Image]]


class Answerer:
    """Wraps (model, tokenizer, processor): `generate` for batches of conversations, `loglikelihoods` for options."""

    def __init__(self, model: nn.Module, tokenizer: Any, processor: Any = None) -> None:
        from vlm.data.collate import Collator
        from vlm.data.tokens import stop_token_ids
        from vlm.loading import build_processor

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = processor or build_processor(model, tokenizer)
        self.collate = Collator(tokenizer.pad_token_id, padding_side="left")
        self.stop_ids = stop_token_ids(tokenizer)

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str | torch.device | None = "auto",
                 dtype: str | torch.dtype | None = "auto", trust_remote_code: bool = False) -> Answerer:
        """Load a model directory (as data, vlm.models.registry) onto `device` in `dtype` (vlm.device)."""
        from vlm.device import place
        from vlm.models.vlm import VisionLanguageModel

        model, tokenizer = VisionLanguageModel.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        if tokenizer is None:
            raise ValueError(f"{model_dir} has no tokenizer files: it cannot be evaluated by generation")
        return cls(place(model, device, dtype), tokenizer)

    @property
    def device(self) -> torch.device:
        from vlm.device import device_of

        return device_of(self.model)

    def prompt(self, messages: list[dict[str, str]], images: Sequence[Image.Image] = ()) -> dict[str, Any]:
        """Processor output for a conversation that ends with a user turn (ids end in the assistant prompt)."""
        from vlm.data.formats import Record

        return self.processor.prompt(Record(messages=list(messages), images=list(images)))

    def decode(self, tokens: Sequence[int]) -> str:
        kept = [t for t in tokens if t not in self.stop_ids and t != self.tokenizer.pad_token_id]
        return self.tokenizer.decode(kept, skip_special_tokens=True).strip()

    @torch.no_grad()
    def generate(self, conversations: Sequence[Conversation], max_new_tokens: int = 32, **options: Any) -> list[str]:
        """One reply per conversation, generated in one left-padded batch (options: temperature, top_p,
        num_beams, generator)."""
        from vlm.evaluation.generation import generate

        if not conversations:
            return []
        batch = self.collate([self.prompt(messages, images) for messages, images in conversations])
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        tokens = generate(self.model, batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                          max_new_tokens=max_new_tokens, eos_token_ids=self.stop_ids,
                          pad_token_id=self.tokenizer.pad_token_id, **options)
        return [self.decode(row.tolist()) for row in tokens]

    @torch.no_grad()
    def loglikelihoods(self, messages: list[dict[str, str]], images: Sequence[Image.Image],
                       continuations: Sequence[str]) -> list[tuple[float, int]]:
        """(sum of log p, token count) of each continuation as the assistant's reply to `messages`.

        The prompt (and its images) is embedded once; all continuations are scored in one right-padded batch.
        """
        from vlm.evaluation.generation import positions_from_mask

        model = self.model
        prompt = self.prompt(messages, images)
        prompt_ids = prompt["input_ids"].to(self.device)
        pixel_values = prompt.get("pixel_values")
        options = [list(self.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in continuations]
        if any(not o for o in options):
            raise ValueError(f"an option tokenises to nothing: {list(continuations)!r}")
        n, length, longest = len(options), prompt_ids.shape[0], max(len(o) for o in options)
        ids = torch.full((n, length + longest), self.tokenizer.pad_token_id, dtype=torch.long, device=self.device)
        attention = torch.zeros_like(ids)
        for i, option in enumerate(options):
            ids[i, :length] = prompt_ids
            ids[i, length : length + len(option)] = torch.tensor(option, device=self.device)
            attention[i, : length + len(option)] = 1
        prompt_embeds = model.embed(prompt_ids[None], None if pixel_values is None else pixel_values.to(self.device))
        option_embeds = model.decoder.get_input_embeddings()(ids[:, length:])
        embeds = torch.cat([prompt_embeds.expand(n, -1, -1), option_embeds], dim=1)
        logits = model.decoder(inputs_embeds=embeds, attention_mask=model.attention_bias(ids, attention),
                               position_ids=positions_from_mask(attention), use_cache=False).logits
        logprobs = torch.log_softmax(logits[:, length - 1 : -1].float(), dim=-1)
        targets = ids[:, length:]
        picked = logprobs.gather(-1, targets[..., None]).squeeze(-1) * attention[:, length:]
        return [(float(picked[i].sum()), len(options[i])) for i in range(n)]
