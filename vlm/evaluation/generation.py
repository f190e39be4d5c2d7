"""Text generation from a VisionLanguageModel with a KV cache.

The prompt (with its image features spliced in) is run once through the decoder; after that each new token costs
one decoder step over the cache. The prefill uses the model's own attention mask (causal, or GIT's prefix mask as a
4D additive mask, which `generate()` refuses), so generation sees exactly what training saw. Batches are
left-padded; position ids count real tokens only, so a padded row generates what it would alone. Beam search
shares the prefill and copies the cache to its beams (`batch_repeat_interleave`), then reorders it each step.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


@functools.cache
def _forward_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def _step_kwargs(decoder: nn.Module, cache: Any) -> dict[str, Any]:
    """The cache argument under the decoder's own name (transformers >= 5.2x: `cache`, before and in remote code:
    `past_key_values`), and `logits_to_keep=1` where supported: only the last position's logits are needed."""
    params = _forward_parameters(type(decoder))
    kwargs: dict[str, Any] = {"cache" if "cache" in params else "past_key_values": cache}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    return kwargs


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: each row counts its real tokens from 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _next_token(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Greedy at temperature 0, otherwise a sample from the temperature-scaled, top-p truncated distribution."""
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
    num_beams: int = 1,
    length_penalty: float = 1.0,
) -> torch.Tensor:
    """Return the new tokens, (B, <= max_new_tokens), padded with `pad_token_id` after a row's end token.

    `temperature=0` is greedy decoding; `num_beams > 1` is beam search (see `beam_search`). `use_cache=False`
    re-runs the whole sequence each step (for tests and benchmarks: both paths must give the same tokens).
    """
    from transformers import DynamicCache

    if num_beams > 1:
        return beam_search(model, input_ids, attention_mask, pixel_values, num_beams=num_beams,
                           max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
                           length_penalty=length_penalty)
    if input_ids.shape[0] and (attention_mask[:, -1] == 0).any():
        raise ValueError("generation needs left padding: the last column of attention_mask must be all ones")
    eos = torch.tensor(sorted(set(eos_token_ids)), device=input_ids.device, dtype=torch.long)
    decoder = model.decoder
    embeds = model.embed(input_ids, pixel_values)  # images are encoded once, on either path
    cache = DynamicCache() if use_cache else None
    step = _step_kwargs(decoder, cache)
    out = decoder(
        inputs_embeds=embeds,
        attention_mask=model.attention_bias(input_ids, attention_mask),
        position_ids=positions_from_mask(attention_mask),
        use_cache=use_cache,
        **step,
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
        if bool(done.all()) or len(new_tokens) == max_new_tokens:
            break
        attn = torch.cat([attn, torch.ones_like(token[:, None])], dim=1)
        if use_cache:
            out = decoder(
                input_ids=token[:, None],
                attention_mask=attn,
                position_ids=positions_from_mask(attn)[:, -1:],
                use_cache=True,
                **step,
            )
        else:  # the reference path: the whole sequence again, each step
            ids = torch.cat([ids, token[:, None]], dim=1)
            embeds = torch.cat([embeds, decoder.get_input_embeddings()(token[:, None])], dim=1)
            out = decoder(
                inputs_embeds=embeds,
                attention_mask=model.attention_bias(ids, attn),
                position_ids=positions_from_mask(attn),
                use_cache=False,
                **step,
            )
    if not new_tokens:
        return input_ids.new_zeros((batch, 0))
    return torch.stack(new_tokens, dim=1)


def _prefill(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             pixel_values: torch.Tensor | None, cache) -> torch.Tensor:
    """Run the prompt once (the model's own mask, images spliced in) and return the last position's logits."""
    out = model.decoder(
        inputs_embeds=model.embed(input_ids, pixel_values),
        attention_mask=model.attention_bias(input_ids, attention_mask),
        position_ids=positions_from_mask(attention_mask),
        use_cache=True,
        **_step_kwargs(model.decoder, cache),
    )
    return out.logits[:, -1]


@torch.no_grad()
def beam_search(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    num_beams: int = 4,
    max_new_tokens: int = 32,
    eos_token_ids: Iterable[int] = (),
    pad_token_id: int = 0,
    length_penalty: float = 1.0,
) -> torch.Tensor:
    """Beam search with a KV cache; returns the best hypothesis per row, (B, <= max_new_tokens), pad-filled.

    Each step keeps the `num_beams` best unfinished continuations out of the 2*num_beams best candidates; a
    candidate ending in an end token (ranked within the first `num_beams`) becomes a finished hypothesis scored
    sum(log p) / length**length_penalty. A row stops once it holds `num_beams` finished hypotheses (early
    stopping), so width 1 is exactly greedy decoding. At `max_new_tokens` the open beams join the finished ones.
    """
    from transformers import DynamicCache

    if (attention_mask[:, -1] == 0).any():
        raise ValueError("generation needs left padding: the last column of attention_mask must be all ones")
    batch, width = input_ids.shape[0], int(num_beams)
    eos = set(int(t) for t in eos_token_ids)
    cache = DynamicCache()
    logprobs = torch.log_softmax(_prefill(model, input_ids, attention_mask, pixel_values, cache).float(), -1)
    cache.batch_repeat_interleave(width)
    logprobs = logprobs.repeat_interleave(width, dim=0)
    attn = attention_mask.repeat_interleave(width, dim=0)
    scores = torch.full((batch, width), float("-inf"), device=input_ids.device)
    scores[:, 0] = 0.0  # identical beams at the start: only the first may expand
    tokens = input_ids.new_zeros((batch * width, 0))
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch
    for step in range(max_new_tokens):
        vocab = logprobs.shape[-1]
        candidates = (scores.view(-1, 1) + logprobs).view(batch, width * vocab)
        top_scores, top_index = candidates.topk(min(2 * width, width * vocab), dim=1)
        next_scores = torch.full_like(scores, float("-inf"))
        next_beam = torch.zeros_like(scores, dtype=torch.long)
        next_token = torch.full_like(next_beam, pad_token_id)
        for b in range(batch):
            if done[b]:
                continue
            kept = 0
            for rank, (score, index) in enumerate(zip(top_scores[b].tolist(), top_index[b].tolist())):
                beam, token = divmod(index, vocab)
                if token in eos:
                    if rank < width:
                        hypothesis = tokens[b * width + beam].tolist() + [token]
                        finished[b].append((score / len(hypothesis) ** length_penalty, hypothesis))
                    continue
                next_scores[b, kept], next_beam[b, kept], next_token[b, kept] = score, beam, token
                kept += 1
                if kept == width:
                    break
            done[b] = len(finished[b]) >= width
        order = (torch.arange(batch, device=input_ids.device)[:, None] * width + next_beam).view(-1)
        tokens = torch.cat([tokens[order], next_token.view(-1, 1)], dim=1)
        scores = next_scores
        if all(done) or step == max_new_tokens - 1:
            break
        attn = torch.cat([attn[order], torch.ones_like(attn[:, :1])], dim=1)
        cache.reorder_cache(order)
        out = model.decoder(input_ids=next_token.view(-1, 1), attention_mask=attn,
                            position_ids=positions_from_mask(attn)[:, -1:], use_cache=True,
                            **_step_kwargs(model.decoder, cache))
        logprobs = torch.log_softmax(out.logits[:, -1].float(), -1)
    best: list[list[int]] = []
    for b in range(batch):
        pool = list(finished[b])
        if not done[b]:
            for k in range(width):
                if scores[b, k] > float("-inf"):
                    hypothesis = tokens[b * width + k].tolist()
                    pool.append((float(scores[b, k]) / max(1, len(hypothesis)) ** length_penalty, hypothesis))
        best.append(max(pool, key=lambda item: item[0])[1] if pool else [])
    length = max((len(h) for h in best), default=0)
    out_tokens = input_ids.new_full((batch, length), pad_token_id)
    for b, hypothesis in enumerate(best):
        out_tokens[b, : len(hypothesis)] = torch.tensor(hypothesis, dtype=torch.long, device=out_tokens.device)
    return out_tokens
