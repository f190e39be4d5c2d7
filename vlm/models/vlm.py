"""The vision-language model: encoder -> projector -> splice into the decoder's embeddings -> decoder.

Image features replace the `<image>` placeholder embeddings one for one (the processor already wrote as many
placeholders as a tile has tokens), so the decoder is an unmodified Hugging Face causal LM and LoRA, generation and
export work on it as on any LM. `attention="prefix"` lets the tokens of one image attend to each other both ways
(GIT); text stays causal.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm.models.attention import (
    VARLEN,
    additive_mask,
    allowed_pairs,
    attn_implementation,
    flatten_packed,
    segment_ids,
    varlen_kwargs,
)
from vlm.models.attention import isolation as decoder_isolation
from vlm.models.decoders import decoder_export_config
from vlm.models.directory import plain as _plain
from vlm.models.directory import write_model_directory
from vlm.models.encoders.base import WEIGHTS_NAME, VisionEncoder
from vlm.models.registry import build, build_part, check_file

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"  # the placeholder of the tokens contract (vlm/data/tokens.py)
CONFIG_NAME = "vlm.yaml"
ATTENTIONS = ("causal", "prefix")
IGNORE_INDEX = -100  # label of tokens that carry no loss (the processor's and Hugging Face's convention)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
PARTS = {"encoder": "encoder", "projector": "projector", "decoder": "decoder"}  # config key -> registry kind


class VisionLanguageModel(nn.Module):
    """Parts are plain attributes (`encoder`, `projector`, `decoder`): stages freeze them by name and LoRA may
    replace `decoder`. `config` is the recipe the model was built from (tokenizer, max_length, max_tiles, ...)."""

    def __init__(
        self,
        encoder: VisionEncoder,
        projector: nn.Module,
        decoder: nn.Module,
        image_token_id: int,
        attention: str = "causal",
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        self.encoder, self.projector, self.decoder = encoder, projector, decoder
        self.image_token_id = int(image_token_id)
        self.attention = attention
        self._masked_logits: bool | None = None  # does the decoder take a boolean `logits_to_keep`? (checked once)
        self._isolation_logged: str | None = None  # the packed-row isolation path last logged
        self.config: dict[str, Any] = {**dict(config or {}), "attention": attention}

    # ---- building -------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], tokenizer: Any = None, trusted: bool = True,
                    trust_remote_code: bool | None = None) -> VisionLanguageModel:
        """Build the parts of a model config (`encoder`, `projector` partial, `decoder`: Hydra specs or registered
        types). `trusted=False` for a config read back from disk (a run's config.yaml): registered types only, and
        `trust_remote_code` from the caller (vlm.models.registry).

        With a tokenizer the decoder's vocabulary is resized to `len(tokenizer)` and `<image>` is looked up.
        """
        cfg = _plain(cfg)
        if not trusted:
            check_file(cfg, PARTS, "model config")
        options = {"trusted": trusted, "trust_remote_code": trust_remote_code}
        encoder = build_part("encoder", cfg["encoder"], "model.encoder", **options)
        decoder_spec = dict(cfg["decoder"])
        if tokenizer is not None and decoder_spec.get("config") and not decoder_spec.get("pretrained"):
            # Random weights: size the vocabulary right away. Resizing afterwards would give every added row
            # the same mean embedding, and words that only the tokenizer knows would start indistinguishable.
            decoder_spec["config"] = {**decoder_spec["config"], "vocab_size": len(tokenizer)}
        decoder = build_part("decoder", decoder_spec, "model.decoder", **options)
        image_token_id = -1
        if tokenizer is not None:
            resize_vocabulary(decoder, len(tokenizer))
            image_token_id = image_token_id_of(tokenizer)
        projector = build_part("projector", cfg["projector"], "model.projector", **options,
                               in_dim=encoder.hidden_size, out_dim=_embedding_dim(decoder))
        return cls(encoder, projector, decoder, image_token_id, cfg.get("attention", "causal"), config=cfg)

    @property
    def tokens_per_image(self) -> int:
        """Tokens one image tile becomes after the projector (= `<image>` placeholders per tile)."""
        return self.projector.num_tokens(self.encoder.num_tokens, self.encoder.grid)

    # ---- forward --------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) tiles -> (N, tokens_per_image, D_lm)."""
        return self.projector(self.encoder(pixel_values), self.encoder.grid)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features written over the `<image>` placeholders, tile after tile.

        `image_features` (N, tokens_per_image, D_lm), already encoded, replace `pixel_values` (the dpo stage encodes
        a pair's images once and splices them into both replies' sequences)."""
        embeds = self.decoder.get_input_embeddings()(input_ids.clamp(min=0))
        slots = input_ids == self.image_token_id
        n_slots = int(slots.sum())
        if pixel_values is None and image_features is None:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} {IMAGE_TOKEN} tokens but no pixel_values were given")
            return embeds
        features = self.encode_images(pixel_values) if image_features is None else image_features
        n_features = features.shape[0] * features.shape[1]
        if n_features != n_slots:
            raise ValueError(
                f"input_ids hold {n_slots} {IMAGE_TOKEN} tokens but the images give {n_features} features "
                f"({features.shape[0]} tiles x {features.shape[1]} tokens per tile)"
            )
        return embeds.masked_scatter(slots.unsqueeze(-1), features.to(embeds.dtype))

    def attention_bias(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, dtype: torch.dtype | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`causal`: the 2D padding mask as is. `prefix`, or packed rows (`segments`, the (B, L) sample numbers of
        `vlm.models.attention.segment_ids`): an additive float (B, 1, L, L) mask in `dtype` (default: the embedding
        weights'; `forward` passes its embeddings' dtype, which is the compute dtype under FSDP).

        Prefix: position i sees j if j <= i, or if both lie in the same contiguous run of `<image>` tokens; padded
        columns are blocked. Packed: only inside the sample. A boolean 4D mask would be read as +1/0 by eager
        attention (no masking), hence floats.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.attention == "causal" and segments is None:
            return attention_mask
        allowed = allowed_pairs(input_ids, attention_mask, self.image_token_id, self.attention == "prefix", segments)
        return additive_mask(allowed, dtype or self.decoder.get_input_embeddings().weight.dtype)

    def isolation(self) -> str:
        """How packed rows keep samples apart on this decoder: `mask` or `varlen` (`vlm.models.attention`)."""
        path = decoder_isolation(self.decoder)
        if path == VARLEN and self.attention == "prefix":
            raise ValueError("packed rows under flash attention take the varlen path, which is causal only: prefix "
                             "attention needs attn_implementation sdpa or eager (a 4D mask)")
        if self._isolation_logged != path:
            self._isolation_logged = path
            log.info("packed rows: samples isolated by %s (decoder attention %r)",
                     "a padding-free varlen flash-attention call from the position ids, no mask" if path == VARLEN
                     else f"a block-diagonal additive 4D mask ({self.attention} inside each sample)",
                     attn_implementation(self.decoder))
        return path

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        packed: bool = False,
        image_features: torch.Tensor | None = None,
        **decoder_kwargs: Any,
    ):
        """-> the decoder's `CausalLMOutputWithPast` (loss when `labels` are given; -100 is ignored).

        `packed`: rows of several samples, each starting at position 0 (`position_ids`, required): attention stays
        inside each sample (`isolation`). On the `varlen` path the outputs are one padding-free row of the real
        tokens, row after row. No KV cache is built unless `use_cache=True` is passed (training needs none).
        """
        decoder_kwargs.setdefault("use_cache", False)
        segments = None
        if packed:
            if position_ids is None:
                raise ValueError("packed rows need their position_ids (0 at the start of every sample)")
            if self.isolation() == VARLEN:
                if attention_mask is not None:
                    keep = decoder_kwargs.get("logits_to_keep")
                    if isinstance(keep, torch.Tensor) and keep.dim() == 2:
                        decoder_kwargs["logits_to_keep"] = flatten_packed(attention_mask, keep)[0]
                    extra = [labels] if labels is not None else []
                    input_ids, position_ids, *extra = flatten_packed(attention_mask, input_ids, position_ids, *extra)
                    labels = extra[0] if extra else None
                    attention_mask = None
                decoder_kwargs.update(varlen_kwargs(position_ids))
            else:
                segments = segment_ids(position_ids, attention_mask)
        embeds = self.embed(input_ids, pixel_values, image_features)
        mask = None if packed and segments is None else self.attention_bias(input_ids, attention_mask, embeds.dtype,
                                                                           segments)
        return self.decoder(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids,
            labels=labels,
            **decoder_kwargs,
        )

    def next_token_loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over the labelled tokens: `forward(..., labels=labels).loss`, but the
        decoder's LM head runs only at the positions whose next token is labelled (`labelled_logits`).

        `position_ids` given: packed rows (`forward(packed=True)`); the mean is over every labelled token of the
        batch either way, so packing does not reweight samples."""
        logits, targets, _ = self.labelled_logits(input_ids, labels, attention_mask, pixel_values,
                                                  position_ids=position_ids)
        return F.cross_entropy(logits.float(), targets)

    def labelled_logits(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (n, vocab), targets (n,), labelled (B, L-1) mask) at the n positions whose next token is labelled.

        The LM head runs only there (`logits_to_keep` as a boolean mask). With loss on assistant replies only that
        is a small share of the sequence, and the (B, L, vocab) logits are never built: less compute, and far less
        memory for a large vocabulary. Rows of the result follow the mask in row-major order. `position_ids`:
        packed rows; on the varlen path the mask is over the one flattened row of real tokens."""
        packed = position_ids is not None
        if packed and attention_mask is not None and self.isolation() == VARLEN:
            input_ids, labels, position_ids = flatten_packed(attention_mask, input_ids, labels, position_ids)
            attention_mask = None
        extra = {"position_ids": position_ids, "packed": True} if packed else {}
        targets = labels[:, 1:]
        labelled = targets != IGNORE_INDEX
        keep = F.pad(labelled, (0, 1), value=False)  # position i predicts token i + 1
        logits = None
        if self._masked_logits is not False:
            logits = self(input_ids, attention_mask, pixel_values, image_features=image_features,
                          logits_to_keep=keep, **extra).logits
            if self._masked_logits is None:  # checked once (the count is a host sync on a GPU)
                expected = (int(labelled.sum()), self.decoder.get_output_embeddings().out_features)
                self._masked_logits = tuple(logits.shape) == expected  # False: older model code ignores the mask
                if not self._masked_logits:
                    logits = None
        if logits is None:
            logits = self(input_ids, attention_mask, pixel_values, image_features=image_features, **extra).logits[keep]
        return logits, targets[labelled], labelled

    def reply_logps(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-probability of each row's labelled tokens (B,), labelled token count per row (B,)).

        What preference losses compare: log pi(reply | prompt, images) = the sum over the reply's tokens."""
        logits, targets, labelled = self.labelled_logits(input_ids, labels, attention_mask, pixel_values,
                                                         image_features)
        token_logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        rows = labelled.nonzero()[:, 0]
        sums = torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=token_logps.device)
        return sums.index_add(0, rows, token_logps), labelled.sum(-1)

    # ---- model directory ------------------------------------------------------------------------------------
    def export_config(self) -> dict[str, Any]:
        """The config of `vlm.yaml`: the recipe's other keys plus part specs that rebuild offline."""
        decoder_spec = self.config.get("decoder") or {}
        return {
            **self.config,
            "encoder": self.encoder.export_config(),
            "projector": self.projector.export_config(),
            "decoder": decoder_export_config(self.decoder, bool(decoder_spec.get("trust_remote_code", False))),
            "attention": self.attention,
            "image_token_id": self.image_token_id,
        }

    def save_pretrained(self, directory: str | Path, tokenizer: Any = None) -> Path:
        """Write `vlm.yaml`, `model.safetensors` and the tokenizer; all or nothing (temp dir, then rename)."""
        return write_model_directory(self, directory, self.export_config(), CONFIG_NAME, WEIGHTS_NAME, tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path,
                        trust_remote_code: bool = False) -> tuple[VisionLanguageModel, Any]:
        """Load a model directory -> (model, tokenizer or None). Parts are rebuilt from `vlm.yaml` through the
        registry of part types (the file is data: it never names code to run, vlm.models.registry); nothing is
        downloaded; every weight must be present. `trust_remote_code` is the caller's, never the file's."""
        from omegaconf import OmegaConf
        from safetensors.torch import load_model

        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{directory} is not a model directory (no {CONFIG_NAME})")
        where = str(directory / CONFIG_NAME)
        spec = OmegaConf.to_container(OmegaConf.load(directory / CONFIG_NAME))
        check_file(spec, PARTS, where)
        encoder = build("encoder", spec["encoder"], f"{where}: encoder")
        decoder = build("decoder", spec["decoder"], f"{where}: decoder", trust_remote_code=trust_remote_code)
        projector = build("projector", spec["projector"], f"{where}: projector", in_dim=encoder.hidden_size,
                          out_dim=_embedding_dim(decoder))
        model = cls(encoder, projector, decoder, spec.get("image_token_id", -1), spec.get("attention", "causal"),
                    config=spec)
        load_model(model, directory / WEIGHTS_NAME, strict=True)
        tokenizer = None
        if any((directory / name).is_file() for name in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
        return model, tokenizer


# ---- helpers ----------------------------------------------------------------------------------------------------
def resize_vocabulary(decoder: nn.Module, size: int) -> None:
    """Give the decoder one embedding row per tokenizer entry; new rows start near the mean of the old ones."""
    if decoder.get_input_embeddings().num_embeddings != size:
        decoder.resize_token_embeddings(size, mean_resizing=True)


def image_token_id_of(tokenizer: Any) -> int:
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or (token_id == tokenizer.unk_token_id and tokenizer.unk_token != IMAGE_TOKEN):
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token: add it (vlm.data.tokens.add_vlm_tokens)")
    return int(token_id)


def _embedding_dim(decoder: nn.Module) -> int:
    return int(decoder.get_input_embeddings().embedding_dim)
