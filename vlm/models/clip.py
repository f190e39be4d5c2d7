"""The dual encoder of the `clip` stage: vision tower + text tower, linear projections to a shared embedding size,
L2-normalised embeddings, a learned temperature (and bias, for SigLIP's sigmoid loss).

The vision tower is any `VisionEncoder` of the `model/encoder` group, so a CLIP run's model directory can be named
as the encoder of a VLM stage: `model.encoder.init_from=<clip run>/model` loads its `encoder.*` weights (position
tables are resampled when the resolution differs). The text tower is a `vlm.models.text_encoders.TextEncoder`.

Model directory: `clip.yaml` (part specs from `export_config`, so loading never downloads), `model.safetensors`
(keys `encoder.*`, `text_encoder.*`, `image_proj.*`, `text_proj.*`, `head.*`) and the tokenizer files.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm.losses import (
    CLIP_INIT_LOGIT_SCALE,
    MAX_LOGIT_SCALE,
    SIGLIP_INIT_LOGIT_BIAS,
    SIGLIP_INIT_LOGIT_SCALE,
    contrastive_loss,
    distributed_loss,
    siglip_loss,
)
from vlm.models.directory import plain as _plain
from vlm.models.directory import write_model_directory
from vlm.models.encoders.base import WEIGHTS_NAME, VisionEncoder
from vlm.models.registry import build, build_part, check_file
from vlm.models.text_encoders import TextEncoder

if TYPE_CHECKING:
    from vlm.data.clip_processor import ClipProcessor

CONFIG_NAME = "clip.yaml"
LOSSES = ("clip", "siglip")
IMAGE_POOLINGS = ("encoder", "mean")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
PARTS = {"encoder": "encoder", "text_encoder": "text_encoder"}  # config key -> registry kind


class ContrastiveHead(nn.Module):
    """The learned log-scale (shape [1]) and, for the sigmoid loss, the learned bias (shape [1])."""

    def __init__(self, loss: str = "clip", init_logit_scale: float | None = None,
                 init_logit_bias: float | None = None) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
        self.loss = loss
        if init_logit_scale is None:
            init_logit_scale = CLIP_INIT_LOGIT_SCALE if loss == "clip" else SIGLIP_INIT_LOGIT_SCALE
        self.logit_scale = nn.Parameter(torch.full([1], float(init_logit_scale)))
        if loss == "siglip":
            bias = SIGLIP_INIT_LOGIT_BIAS if init_logit_bias is None else init_logit_bias
            self.logit_bias = nn.Parameter(torch.full([1], float(bias)))
        else:
            self.register_parameter("logit_bias", None)

    @torch.no_grad()
    def clamp_(self, max_logit_scale: float = MAX_LOGIT_SCALE) -> None:
        self.logit_scale.clamp_(max=max_logit_scale)


class ClipModel(nn.Module):
    """Parts are plain attributes (`encoder`, `text_encoder`, `image_proj`, `text_proj`, `head`): stages name them in
    `trainable` (e.g. LiT: `[encoder, image_proj, head]` with a frozen pretrained text tower)."""

    def __init__(
        self,
        encoder: VisionEncoder,
        text_encoder: TextEncoder,
        embed_dim: int = 512,
        loss: str = "clip",
        init_logit_scale: float | None = None,
        init_logit_bias: float | None = None,
        image_pooling: str = "encoder",
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if image_pooling not in IMAGE_POOLINGS:
            raise ValueError(f"unknown image_pooling {image_pooling!r}; expected one of {IMAGE_POOLINGS}")
        self.encoder, self.text_encoder = encoder, text_encoder
        self.image_pooling = image_pooling
        self.image_proj = nn.Linear(encoder.hidden_size, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_encoder.hidden_size, embed_dim, bias=False)
        self.head = ContrastiveHead(loss, init_logit_scale, init_logit_bias)
        self.embed_dim = int(embed_dim)
        self.config: dict[str, Any] = {**dict(config or {}), "embed_dim": self.embed_dim, "loss": loss,
                                       "image_pooling": image_pooling}
        self.tokenizer: Any = None  # set by from_config / from_pretrained; used by processor() and the eval tasks

    @property
    def loss_kind(self) -> str:
        return self.head.loss

    # ---- building -------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], tokenizer: Any = None, trusted: bool = True,
                    trust_remote_code: bool | None = None) -> ClipModel:
        """Build the parts of a model config (`encoder`, `text_encoder`: Hydra specs or registered types,
        `embed_dim`, `loss`); `trusted=False` for a config read back from disk (vlm.models.registry).

        With a tokenizer, a text tower built from its config gets one embedding row per tokenizer entry and the
        tokenizer's special ids; a pretrained tower grows only if the tokenizer is larger than its vocabulary.
        """
        cfg = _plain(cfg)
        if not trusted:
            check_file(cfg, PARTS, "model config")
        text_spec = dict(cfg["text_encoder"])
        if tokenizer is not None and not text_spec.get("pretrained") and text_spec.get("config") is not None:
            text_spec["config"] = {**text_spec["config"], "vocab_size": len(tokenizer),
                                   **_special_ids(tokenizer, text_spec["config"])}
        options = {"trusted": trusted, "trust_remote_code": trust_remote_code}
        encoder = build_part("encoder", cfg["encoder"], "model.encoder", **options)
        text_encoder = build_part("text_encoder", text_spec, "model.text_encoder", **options)
        if tokenizer is not None:
            text_encoder.fit_vocabulary(len(tokenizer))
        model = cls(encoder, text_encoder, embed_dim=cfg.get("embed_dim", 512), loss=cfg.get("loss", "clip"),
                    init_logit_scale=cfg.get("init_logit_scale"), init_logit_bias=cfg.get("init_logit_bias"),
                    image_pooling=cfg.get("image_pooling", "encoder"), config=cfg)
        model.tokenizer = tokenizer
        return model

    # ---- forward --------------------------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor, mask_ratio: float = 0.0, normalize: bool = True) -> torch.Tensor:
        """(N, 3, H, W) -> (N, embed_dim); FLIP-masked at `mask_ratio` in training mode only.

        image_pooling `encoder`: the backbone's own pooling (CLS + norm for CLIP and timm ViTs, SigLIP's attention
        head); `mean`: the mean of the (kept) patch tokens of the last layer.
        """
        if self.image_pooling == "mean":
            pooled = self.encoder.forward_features(pixel_values, mask_ratio)[:, self.encoder.num_prefix_tokens:].mean(1)
        else:
            pooled = self.encoder.forward_pooled(pixel_values, mask_ratio)
        x = self.image_proj(pooled)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        """(B, L) token ids -> (B, embed_dim)."""
        x = self.text_proj(self.text_encoder(input_ids, attention_mask))
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                mask_ratio: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image embeddings, text embeddings), both L2-normalised, (B, embed_dim)."""
        return self.encode_image(pixel_values, mask_ratio), self.encode_text(input_ids, attention_mask)

    @property
    def logit_scale(self) -> torch.Tensor:
        """The multiplier (exp of the learned log-scale), shape [1]."""
        return self.head.logit_scale.exp()

    def loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """The model's loss; `gather`: this rank's pairs against every rank's (under DDP/FSDP), else local only."""
        if gather:
            return distributed_loss(self.loss_kind, image_emb, text_emb, self.logit_scale, self.head.logit_bias)
        if self.loss_kind == "clip":
            return contrastive_loss(image_emb, text_emb, self.logit_scale)
        return siglip_loss(image_emb, text_emb, self.logit_scale, self.head.logit_bias)

    def clamp_logit_scale(self) -> None:
        """Clamp the multiplier at 100 (CLIP); call after each optimizer step."""
        self.head.clamp_()

    # ---- processing -----------------------------------------------------------------------------------------
    def processor(self, tokenizer: Any = None) -> ClipProcessor:
        """The processor that turns records, images and texts into this model's tensors."""
        from vlm.data.clip_processor import ClipProcessor
        from vlm.data.images import ImageTransform

        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is None:
            raise ValueError("this model has no tokenizer: pass one")
        transform = ImageTransform(self.encoder.image_size, self.encoder.image_mean, self.encoder.image_std)
        return ClipProcessor(tokenizer, transform, self.text_encoder.max_length)

    # ---- model directory ------------------------------------------------------------------------------------
    def export_config(self) -> dict[str, Any]:
        return {
            **self.config,
            "kind": "clip",
            "encoder": self.encoder.export_config(),
            "text_encoder": self.text_encoder.export_config(),
            "embed_dim": self.embed_dim,
            "loss": self.loss_kind,
            "image_pooling": self.image_pooling,
        }

    def save_pretrained(self, directory: str | Path, tokenizer: Any = None) -> Path:
        """Write `clip.yaml`, `model.safetensors` and the tokenizer; all or nothing (temp dir, then rename)."""
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        return write_model_directory(self, directory, self.export_config(), CONFIG_NAME, WEIGHTS_NAME, tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path, trust_remote_code: bool = False) -> tuple[ClipModel, Any]:
        """Load a model directory -> (model, tokenizer or None); nothing is downloaded; every weight must be present.
        Parts are rebuilt through the registry of part types: `clip.yaml` never names code (vlm.models.registry)."""
        from omegaconf import OmegaConf
        from safetensors.torch import load_model

        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{directory} is not a CLIP model directory (no {CONFIG_NAME})")
        where = str(directory / CONFIG_NAME)
        spec = OmegaConf.to_container(OmegaConf.load(directory / CONFIG_NAME))
        check_file(spec, PARTS, where)
        encoder = build("encoder", spec["encoder"], f"{where}: encoder")
        text_encoder = build("text_encoder", spec["text_encoder"], f"{where}: text_encoder",
                             trust_remote_code=trust_remote_code)
        model = cls(encoder, text_encoder, spec["embed_dim"], spec.get("loss", "clip"),
                    image_pooling=spec.get("image_pooling", "encoder"), config=spec)
        load_model(model, directory / WEIGHTS_NAME, strict=True)
        tokenizer = None
        if any((directory / name).is_file() for name in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
        model.tokenizer = tokenizer
        return model, tokenizer


def is_clip_config(model_cfg: Mapping[str, Any]) -> bool:
    """A model config describes a dual encoder when it has a text tower."""
    return model_cfg.get("text_encoder") is not None


# ---- helpers ----------------------------------------------------------------------------------------------------
def _special_ids(tokenizer: Any, config: Mapping[str, Any]) -> dict[str, int]:
    """The tokenizer's pad/bos/eos ids for the keys the text config has (keeps config validation quiet)."""
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    return {k: v for k, v in ids.items() if v is not None and k in config}
