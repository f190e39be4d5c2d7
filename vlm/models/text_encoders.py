"""Text towers for contrastive training: a Hugging Face CLIP text model or any Hugging Face encoder, pooled to one
vector per text.

`pretrained: true` loads weights by name or path (for a full CLIP/SigLIP checkpoint, its text tower); otherwise the
tower is built from the inline `config` dict (with its `model_type`, e.g. `clip_text_model`, `bert`) with random
weights, which is how saved model directories and the meta-device summary rebuild it offline.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

POOLINGS = ("eos", "cls", "mean")
# Config keys that describe where a config came from, not the network's shape (model_type is kept: it picks the class).
BOOKKEEPING_KEYS = ("_name_or_path", "architectures", "transformers_version", "id2label", "label2id")
# Text towers inside two-tower checkpoints: the model_type of the full config -> the class of its text tower.
TEXT_TOWERS = {"clip": "CLIPTextModel", "siglip": "SiglipTextModel", "siglip2": "Siglip2TextModel"}


class TextEncoder(nn.Module):
    """Token ids (B, L) + attention mask -> (B, hidden_size), pooled from the last hidden states.

    pooling: `eos` - the last attended token (CLIP: the end-of-text token, which is last; any causal text tower);
    `cls` - the first token (BERT-style encoders); `mean` - the mean over attended tokens.
    max_length: the longest tokenized text the processor keeps (at most the tower's position table).
    """

    part_type = "hf_text"  # its name in vlm.models.registry

    def __init__(
        self,
        name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        pretrained: bool = False,
        pooling: str = "eos",
        max_length: int = 77,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        self.name_or_path = name_or_path
        self.pooling = pooling
        if pretrained:
            if not name_or_path:
                raise ValueError("pretrained=True needs name_or_path")
            from vlm.hub import named_model

            with named_model(name_or_path, "text encoder", "model.text_encoder.name_or_path"):
                self.model = _model_class(_hf_config(name_or_path)).from_pretrained(name_or_path, dtype=torch.float32)
        else:
            if config is not None:
                cfg = _config_from_dict(config)
            elif name_or_path:
                cfg = _text_config(_hf_config(name_or_path))
            else:
                raise ValueError("a text encoder needs `config` or `name_or_path`")
            from transformers import AutoModel

            self.model = AutoModel.from_config(cfg)
        if getattr(self.model, "pooler", None) is not None:
            # BERT-style pooler heads are never used here (and unused weights would stall DDP's gradient reduction)
            self.model.pooler = None
        cfg = self.model.config
        self.hidden_size = int(cfg.hidden_size)
        positions = getattr(cfg, "max_position_embeddings", None)
        self.max_length = int(min(max_length, positions) if positions else max_length)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().num_embeddings)

    def fit_vocabulary(self, size: int) -> None:
        """Grow the token embeddings to `size` rows if the tokenizer has more entries than the tower."""
        if size > self.vocab_size:
            self.model.resize_token_embeddings(size, mean_resizing=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "mean":
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        # eos: the last attended position (right or left padding alike)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (attention_mask.long() * positions).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def export_config(self) -> dict[str, Any]:
        """The saved spec (`type` + plain arguments) that rebuilds this tower offline: random weights, same shapes."""
        return {
            "type": self.part_type,
            "name_or_path": self.name_or_path,
            "config": clean_text_config(self.model.config),
            "pretrained": False,
            "pooling": self.pooling,
            "max_length": self.max_length,
        }


def clean_text_config(config: Any) -> dict[str, Any]:
    """A transformers config as a plain dict with its `model_type` and without bookkeeping keys."""
    out = {k: v for k, v in config.to_dict().items() if k not in BOOKKEEPING_KEYS}
    out["model_type"] = config.model_type
    return out


def _config_from_dict(config: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    config = {k: v for k, v in config.items() if k not in BOOKKEEPING_KEYS}
    model_type = config.pop("model_type", None)
    if not model_type:
        raise ValueError("a text encoder `config` needs its model_type (e.g. clip_text_model, bert)")
    return AutoConfig.for_model(model_type, **config)


def _hf_config(name_or_path: str) -> Any:
    from transformers import AutoConfig

    from vlm.hub import named_model

    with named_model(name_or_path, "text encoder config", "model.text_encoder.name_or_path"):
        return AutoConfig.from_pretrained(name_or_path)


def _text_config(config: Any) -> Any:
    """The text tower's config of a two-tower checkpoint (CLIP, SigLIP); other configs as they are."""
    return config.text_config if config.model_type in TEXT_TOWERS else config


def _model_class(config: Any) -> Any:
    import transformers

    if config.model_type in TEXT_TOWERS:  # a whole CLIP/SigLIP checkpoint: load its text tower only
        return getattr(transformers, TEXT_TOWERS[config.model_type])
    return transformers.AutoModel
