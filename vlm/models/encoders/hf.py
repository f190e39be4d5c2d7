"""Hugging Face CLIP and SigLIP vision towers as vision encoders.

`pretrained: true` loads real weights by name or path; otherwise the tower is built from the inline `config` dict
with random weights, which is how saved model directories and the meta-device summary rebuild it offline.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from vlm.models.encoders.base import VisionEncoder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Config keys that describe where a config came from, not the network's shape.
BOOKKEEPING_KEYS = ("_name_or_path", "architectures", "transformers_version", "id2label", "label2id", "model_type")


class Family(NamedTuple):
    config_class: str
    model_class: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_prefix_tokens: int  # CLIP has a CLS token, SigLIP none


FAMILIES = {
    "clip": Family("CLIPVisionConfig", "CLIPVisionModel", CLIP_MEAN, CLIP_STD, 1),
    "siglip": Family("SiglipVisionConfig", "SiglipVisionModel", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0),
}


def clean_config(config: Any) -> dict[str, Any]:
    """A transformers config as a plain dict without its bookkeeping keys (safe to write to YAML)."""
    return {k: v for k, v in config.to_dict().items() if k not in BOOKKEEPING_KEYS}


class HFVisionEncoder(VisionEncoder):
    """`CLIPVisionModel` / `SiglipVisionModel` returning the tokens of hidden layer `feature_layer`.

    `feature_layer=-1` is the tower's `last_hidden_state` (SigLIP's includes its post-norm); other negative values
    count blocks from the end (-2 is LLaVA's penultimate layer), non-negative values are block indices.
    """

    part_type = "hf_vision"

    def __init__(
        self,
        family: str,
        name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        pretrained: bool = False,
        image_size: int | None = None,
        feature_layer: int = -1,
        drop_cls: bool = True,
        init_from: str | None = None,
    ) -> None:
        import transformers

        from vlm.hub import named_model

        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"unknown encoder family {family!r}; known families: {sorted(FAMILIES)}")
        spec = FAMILIES[family]
        config_class = getattr(transformers, spec.config_class)
        model_class = getattr(transformers, spec.model_class)
        if pretrained:
            if not name_or_path:
                raise ValueError("pretrained=True needs name_or_path")
            with named_model(name_or_path, "vision encoder", "model.encoder.name_or_path"):
                self.model = model_class.from_pretrained(name_or_path, dtype=torch.float32)
        else:
            if config is not None:
                cfg = config_class(**{k: v for k, v in config.items() if k not in BOOKKEEPING_KEYS})
            elif name_or_path:
                with named_model(name_or_path, "vision encoder config", "model.encoder.name_or_path"):
                    cfg = config_class.from_pretrained(name_or_path)
            else:
                raise ValueError("an HF encoder needs `config` or `name_or_path`")
            self.model = model_class(cfg)
        self.family = family
        self.name_or_path = name_or_path
        cfg = self.model.config
        self.hidden_size = int(cfg.hidden_size)
        self.patch_size = int(cfg.patch_size)
        self.image_size = int(cfg.image_size)
        self.image_mean, self.image_std = spec.mean, spec.std
        self.num_prefix_tokens = spec.num_prefix_tokens
        self.feature_layer = feature_layer
        self.drop_cls = drop_cls
        self._check_feature_layer(int(cfg.num_hidden_layers))
        if image_size is not None and image_size != self.image_size:
            self.set_image_size(image_size)
        if init_from:
            self.load_encoder_weights(init_from)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        last = self.feature_layer == -1
        out = self.model(
            pixel_values=pixel_values.to(self.model.dtype),
            output_hidden_states=not last,
            interpolate_pos_encoding=self.image_size != self.model.config.image_size,
        )
        if last:
            features = out.last_hidden_state
        else:  # hidden_states[0] is the embedding output, [k + 1] block k's
            layer = self.feature_layer if self.feature_layer < 0 else self.feature_layer + 1
            features = out.hidden_states[layer]
        return features[:, self.num_prefix_tokens :] if self.drop_cls else features

    def forward_features(
        self, pixel_values: torch.Tensor, mask_ratio: float = 0.0, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        # The towers' own forward, unrolled (they have no patch-dropout option): embeddings -> FLIP token selection
        # -> (CLIP: pre-layernorm) -> encoder layers -> (SigLIP: post-layernorm); CLIP's post-layernorm is in `pool`.
        m = self.model
        h = m.embeddings(pixel_values.to(m.dtype), interpolate_pos_encoding=self.image_size != m.config.image_size)
        h = self._mask(h, mask_ratio, keep)
        if self.family == "clip":
            h = m.pre_layrnorm(h)
        h = m.encoder(inputs_embeds=h).last_hidden_state
        return m.post_layernorm(h) if self.family == "siglip" else h

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.family == "clip":  # CLIPVisionModel's pooler_output: the CLS token, post-layernorm
            return m.post_layernorm(tokens[:, 0])
        if getattr(m, "use_head", True) and getattr(m, "head", None) is not None:  # SigLIP: attention-pooling head
            return m.head(tokens)
        return tokens.mean(dim=1)

    def set_image_size(self, size: int) -> None:
        # The position table keeps its trained size; it is interpolated on the fly for other resolutions.
        self._check_image_size(size)
        self.image_size = size

    def position_tables(self) -> dict[str, int]:
        return {"model.embeddings.position_embedding.weight": self.num_prefix_tokens}

    def export_config(self) -> dict[str, Any]:
        return {
            "type": self.part_type,
            "family": self.family,
            "name_or_path": self.name_or_path,
            "config": clean_config(self.model.config),
            "pretrained": False,
            "image_size": self.image_size,
            "feature_layer": self.feature_layer,
            "drop_cls": self.drop_cls,
            "init_from": None,
        }
