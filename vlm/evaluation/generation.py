"""Text generation from a VisionLanguageModel with a KV cache.

The prompt (with its image features spliced in) is run once through the decoder; after that each new token costs
one decoder step over the cache. The prefill uses the model's own attention mask (causal, or GIT's prefix mask as a
4D additive mask, which `generate()` refuses), so generation sees exactly what training saw. Batches are
left-padded; position ids count real tokens only, so a padded row generates what it would alone.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set whose mass reaches top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    eos_token_ids: Iterable[int] = (),
    pad_token_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return the new tokens, (B, <= max_new_tokens), padded with `pad_token_id` after a row's end token.

    `temperature=0` is greedy decoding. `use_cache=False` re-runs the whole sequence each step (for tests and
    benchmarks: both paths must give the same tokens).
    """
    from transformers import DynamicCache

    if input_ids.shape[0] and (attention_mask[:, -1] == 0).any():
        raise ValueError("generation needs left padding: the last column of attention_mask must be all ones")
    eos = torch.tensor(sorted(set(eos_token_ids)), device=input_ids.device, dtype=torch.long)
    decoder = model.decoder
    embeds = model.embed(input_ids, pixel_values)
    mask = model.attention_bias(input_ids, attention_mask)
    cache = DynamicCache() if use_cache else None
    out = decoder(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=_positions(attention_mask),
        past_key_values=cache,
        use_cache=use_cache,
    )
    batch = input_ids.shape[0]
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    new_tokens: list[torch.Tensor] = []
    ids, attn = input_ids, attention_mask
    for _ in range(max_new_tokens):
        token = _next_token(out.logits[:, -1], temperature, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        new_tokens.append(token)
        done |= torch.isin(token, eos)
        if bool(done.all()):
            break
        ids = torch.cat([ids, token[:, None]], dim=1)
        attn = torch.cat([attn, torch.ones_like(token[:, None])], dim=1)
        if use_cache:
            out = decoder(
                input_ids=token[:, None],
                attention_mask=attn,
                position_ids=_positions(attn)[:, -1:],
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        else:
            out = decoder(
                inputs_embeds=model.embed(ids, pixel_values),
                attention_mask=model.attention_bias(ids, attn),
                position_ids=_positions(attn),
                use_cache=False,
            )
    if not new_tokens:
        return input_ids.new_zeros((batch, 0))
    return torch.stack(new_tokens, dim=1)
