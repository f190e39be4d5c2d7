"""Any timm ViT as a vision encoder (the quickstart's `tiny_vit` is a timm ViT built small for the CPU)."""

from __future__ import annotations

from typing import Any

import torch

from vlm.models.encoders.base import VisionEncoder


class TimmEncoder(VisionEncoder):
    """A timm ViT; `timm_kwargs` override the architecture (patch_size, embed_dim, depth, num_heads, ...)."""

    part_type = "timm_vit"

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        image_size: int | None = None,
        feature_layer: int = -1,
        drop_cls: bool = True,
        init_from: str | None = None,
        **timm_kwargs: Any,
    ) -> None:
        import timm

        super().__init__()
        self.model_name = model_name
        self.timm_kwargs = dict(timm_kwargs)
        if image_size is not None:
            timm_kwargs["img_size"] = image_size
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **timm_kwargs)
        embed = self.model.patch_embed
        self.patch_size = int(embed.patch_size[0])
        self.image_size = int(embed.img_size[0])
        self.hidden_size = int(self.model.embed_dim)
        self.num_prefix_tokens = int(self.model.num_prefix_tokens)
        cfg = self.model.pretrained_cfg or {}
        self.image_mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.image_std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        self.feature_layer = feature_layer
        self.drop_cls = drop_cls
        self._check_feature_layer(len(self.model.blocks))
        if init_from:
            self.load_encoder_weights(init_from)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # The last layer is taken after the final norm (as forward_features gives it); earlier layers raw.
        (out,) = self.model.forward_intermediates(
            pixel_values.to(next(self.parameters()).dtype),
            indices=[self.feature_layer],
            norm=self.feature_layer == -1,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=not self.drop_cls,
        )
        if isinstance(out, tuple):  # (grid tokens, prefix tokens)
            out = torch.cat([out[1], out[0]], dim=1)
        return out

    def forward_features(
        self, pixel_values: torch.Tensor, mask_ratio: float = 0.0, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        # timm's VisionTransformer.forward_features, with FLIP masking where timm puts its patch dropout
        m = self.model
        for part in ("patch_embed", "_pos_embed", "norm_pre", "blocks", "norm"):
            if not hasattr(m, part):
                raise NotImplementedError(f"{type(m).__name__} is not a plain timm ViT (no {part}): no masked forward")
        x = m.patch_embed(pixel_values.to(next(self.parameters()).dtype))
        x = m.patch_drop(m._pos_embed(x))
        x = self._mask(x, mask_ratio, keep)
        x = m.blocks(m.norm_pre(x))
        return m.norm(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(tokens, pre_logits=True)  # global_pool ('token' = CLS) + fc_norm

    def set_image_size(self, size: int) -> None:
        self._check_image_size(size)
        self.model.set_input_size(img_size=(size, size))
        self.image_size = size

    def position_tables(self) -> dict[str, int]:
        if getattr(self.model, "pos_embed", None) is None:
            return {}
        return {"model.pos_embed": 0 if getattr(self.model, "no_embed_class", False) else self.num_prefix_tokens}

    def export_config(self) -> dict[str, Any]:
        return {
            "type": self.part_type,
            "model_name": self.model_name,
            "pretrained": False,
            "image_size": self.image_size,
            "feature_layer": self.feature_layer,
            "drop_cls": self.drop_cls,
            "init_from": None,
            **self.timm_kwargs,
        }
