"""Vision encoders: images -> patch-token features, behind the `VisionEncoder` contract."""

from vlm.models.encoders.base import VisionEncoder, resample_positions
from vlm.models.encoders.hf import HFVisionEncoder
from vlm.models.encoders.timm_vit import TimmEncoder

__all__ = ["HFVisionEncoder", "TimmEncoder", "VisionEncoder", "resample_positions"]
